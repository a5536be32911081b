// Command-line flags of every binary, declared in one table per program: each flag's
// names, destination, value name, help line and allowed range. The table parses, checks and
// writes --help, so the three programs parse alike:
//   - integers are read into their real range (no 32-bit wrap-around, no fractions), numbers
//     must be finite (no nan or inf), and every value is checked against its range;
//   - a flag's value never swallows the next flag (`--out --name` is an error; write
//     `--name=-x` for a value that starts with a dash); an unknown flag is named as unknown
//     wherever it stands; a flag given twice is an error unless it repeats by design.
#pragma once
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>
#include "common.h"

// allowed values of a number, inclusive unless open
struct Range {
    double lo = -INFINITY, hi = INFINITY;
    bool lo_open = false, hi_open = false;
    static Range at_least(double lo) { return {lo, INFINITY, false, false}; }
    static Range above(double lo) { return {lo, INFINITY, true, false}; }
    static Range between(double lo, double hi) { return {lo, hi, false, false}; }
    bool contains(double x) const {
        return (lo_open ? x > lo : x >= lo) && (hi_open ? x < hi : x <= hi);
    }
    std::string describe() const {
        if (std::isinf(hi)) return strformat("%s %.15g", lo_open ? ">" : ">=", lo);
        if (std::isinf(lo)) return strformat("%s %.15g", hi_open ? "<" : "<=", hi);
        return strformat("in %s%.15g, %.15g%s", lo_open ? "(" : "[", lo, hi, hi_open ? ")" : "]");
    }
};

// a number as written: the whole string, in range for T, finite; `what` names it in errors
template <typename T>
inline T parse_number(const std::string& what, const std::string& v, Range r = {}) {
    static_assert(std::is_arithmetic_v<T>, "numbers only");
    if (v.empty()) THROW("%s expects a number, got an empty value", what.c_str());
    char* end = nullptr;
    errno = 0;
    T x;
    if constexpr (std::is_integral_v<T>) {
        if constexpr (std::is_unsigned_v<T>) {
            if (v[0] == '-') THROW("%s expects a non-negative integer, got '%s'", what.c_str(), v.c_str());
            const unsigned long long u = std::strtoull(v.c_str(), &end, 10);
            if (*end) THROW("%s expects an integer, got '%s'", what.c_str(), v.c_str());
            if (errno == ERANGE || u > std::numeric_limits<T>::max())
                THROW("%s expects an integer in [0, %llu], got '%s'", what.c_str(),
                      (unsigned long long)std::numeric_limits<T>::max(), v.c_str());
            x = (T)u;
        } else {
            const long long s = std::strtoll(v.c_str(), &end, 10);
            if (*end) THROW("%s expects an integer, got '%s'", what.c_str(), v.c_str());
            if (errno == ERANGE || s < std::numeric_limits<T>::min() || s > std::numeric_limits<T>::max())
                THROW("%s expects an integer in [%lld, %lld], got '%s'", what.c_str(),
                      (long long)std::numeric_limits<T>::min(), (long long)std::numeric_limits<T>::max(), v.c_str());
            x = (T)s;
        }
    } else {
        const double d = std::strtod(v.c_str(), &end);
        if (*end) THROW("%s expects a number, got '%s'", what.c_str(), v.c_str());
        if (!std::isfinite(d) || !std::isfinite((T)d)) THROW("%s expects a finite number, got '%s'", what.c_str(), v.c_str());
        x = (T)d;
    }
    if (!r.contains((double)x)) THROW("%s must be %s, got %s", what.c_str(), r.describe().c_str(), v.c_str());
    return x;
}

class Flags {
public:
    explicit Flags(std::string usage) : usage_(std::move(usage)) {}

    void section(const std::string& title) { rows_.push_back({{}, title, "", "", false, false, nullptr}); }

    // a flag with a value: numbers within `r`, strings as given
    template <typename T>
    void add(std::initializer_list<const char*> names, T* dst, const char* meta, const char* help, Range r = {}) {
        Opt o{{names.begin(), names.end()}, "", meta, help, true, false, nullptr};
        if constexpr (std::is_same_v<T, std::string>) {
            o.def = *dst;
            o.set = [dst](const std::string&, const std::string& v) { *dst = v; };
        } else {
            o.def = format_default(*dst);
            o.set = [dst, r](const std::string& f, const std::string& v) { *dst = parse_number<T>("flag " + f, v, r); };
        }
        rows_.push_back(std::move(o));
    }
    // a string from a fixed set
    void choice(std::initializer_list<const char*> names, std::string* dst, std::vector<std::string> allowed,
                const char* help) {
        std::string meta;
        for (auto& a : allowed) meta += (meta.empty() ? "" : "|") + a;
        Opt o{{names.begin(), names.end()}, *dst, meta, help, true, false, nullptr};
        o.set = [dst, allowed, meta](const std::string& f, const std::string& v) {
            for (auto& a : allowed)
                if (v == a) { *dst = v; return; }
            THROW("flag %s must be one of %s, got '%s'", f.c_str(), meta.c_str(), v.c_str());
        };
        rows_.push_back(std::move(o));
    }
    // a switch: present means true
    void flag(std::initializer_list<const char*> names, bool* dst, const char* help) {
        Opt o{{names.begin(), names.end()}, "", "", help, false, false, nullptr};
        o.set = [dst](const std::string&, const std::string&) { *dst = true; };
        rows_.push_back(std::move(o));
    }
    // a flag that may repeat; each value is appended
    void repeat(std::initializer_list<const char*> names, std::vector<std::string>* dst, const char* meta,
                const char* help) {
        Opt o{{names.begin(), names.end()}, "", meta, help, true, true, nullptr};
        o.set = [dst](const std::string&, const std::string& v) { dst->push_back(v); };
        rows_.push_back(std::move(o));
    }

    // Parses argv[first..]; returns the positional arguments. --help prints the help and exits 0.
    std::vector<std::string> parse(int argc, char** argv, int first = 1) {
        std::vector<std::string> positional;
        for (int i = first; i < argc; i++) {
            std::string a = argv[i];
            if (a == "--help" || a == "-h") { print_help(); exit(0); }
            if (a.size() < 2 || a[0] != '-' || looks_numeric(a)) { positional.push_back(a); continue; }
            std::string value;
            bool inline_value = false;
            const size_t eq = a.find('=');
            if (a.rfind("--", 0) == 0 && eq != std::string::npos) {
                value = a.substr(eq + 1);
                a = a.substr(0, eq);
                inline_value = true;
            }
            Opt* o = find(a);
            if (!o) THROW("unknown flag '%s' (see --help)", a.c_str());
            if (o->given && !o->repeatable) THROW("flag '%s' given twice", a.c_str());
            if (!o->takes_value) {
                if (inline_value) THROW("flag '%s' takes no value, got '%s'", a.c_str(), value.c_str());
            } else if (!inline_value) {
                if (i + 1 >= argc) THROW("flag '%s' needs a value (see --help)", a.c_str());
                value = argv[++i];
                if (value.size() > 1 && value[0] == '-' && !looks_numeric(value))
                    THROW("flag '%s' needs a value, got the flag '%s' (write %s=VALUE for a value that starts "
                          "with '-')", a.c_str(), value.c_str(), a.c_str());
            }
            o->set(a, value);
            o->given++;
        }
        return positional;
    }

    // whether the flag (any of its names) was on the command line
    bool given(const std::string& name) const {
        for (auto& o : rows_)
            for (auto& n : o.names)
                if (n == name) return o.given > 0;
        THROW("internal: no flag '%s' in the table", name.c_str());
    }

    void print_help() const {
        printf("%s\n", usage_.c_str());
        for (auto& o : rows_) {
            if (o.names.empty()) { printf("%s\n", o.def.c_str()); continue; }
            std::string left = "  ";
            for (size_t k = 0; k < o.names.size(); k++) left += (k ? ", " : "") + o.names[k];
            if (!o.meta.empty()) left += " " + o.meta;
            std::string help = o.help;
            if (!o.def.empty() && help.find("default") == std::string::npos) help += " (default " + o.def + ")";
            if (left.size() < 26) left.resize(26, ' ');
            else left += "\n" + std::string(26, ' ');
            for (size_t p = 0; (p = help.find('\n', p)) != std::string::npos; p += 27)
                help.insert(p + 1, std::string(26, ' '));
            printf("%s%s\n", left.c_str(), help.c_str());
        }
    }

private:
    struct Opt {
        std::vector<std::string> names;
        std::string def, meta, help;  // section rows: names empty, def holds the title
        bool takes_value, repeatable;
        std::function<void(const std::string& flag, const std::string& value)> set;
        int given = 0;
    };
    std::string usage_;
    std::vector<Opt> rows_;

    Opt* find(const std::string& name) {
        for (auto& o : rows_)
            for (auto& n : o.names)
                if (n == name) return &o;
        return nullptr;
    }
    static bool looks_numeric(const std::string& s) {
        char* end;
        std::strtod(s.c_str(), &end);
        return !s.empty() && *end == '\0';
    }
    template <typename T>
    static std::string format_default(T v) {
        if constexpr (std::is_integral_v<T>) return std::to_string(v);
        else return strformat("%g", (double)v);
    }
};
