// Catch2 main shared by test_cpu and test_gpu: runs the session, then prints the
// closing line "N passed, N failed" (counted in test cases) that CI reads.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#include <cstdio>

static Catch::Totals g_totals;

struct TotalsListener : Catch::TestEventListenerBase {
    using TestEventListenerBase::TestEventListenerBase;
    void testRunEnded(Catch::TestRunStats const& stats) override { g_totals = stats.totals; }
};
CATCH_REGISTER_LISTENER(TotalsListener)

int main(int argc, char** argv) {
    int rc = Catch::Session().run(argc, argv);
    printf("%llu passed, %llu failed\n", (unsigned long long)g_totals.testCases.passed,
           (unsigned long long)g_totals.testCases.failed);
    return rc;
}
