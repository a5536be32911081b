#!/usr/bin/env python3
# Writes data/sft_sample.jsonl: a small instruction set for the fine-tuning test and demo
# (make sft-data). Every task answers in one fixed sentence pattern, so a tiny model
# visibly learns the format in a few hundred steps. Alpaca records (with and without
# "input") and chat records (system turns, two-turn dialogues) are mixed. Deterministic.
# usage: python3 data/make_sft_sample.py [OUT]   (default data/sft_sample.jsonl)
import json
import random
import sys

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"), ("Russia", "Moscow"), ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"), ("Brazil", "Brasilia"),
    ("Argentina", "Buenos Aires"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Australia", "Canberra"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
    ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Greece", "Athens"), ("Turkey", "Ankara"), ("Ireland", "Dublin"),
    ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"), ("Hungary", "Budapest"), ("Cuba", "Havana"),
    ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Nigeria", "Abuja"),
    ("Ghana", "Accra"), ("Morocco", "Rabat"), ("Colombia", "Bogota"), ("Venezuela", "Caracas"),
    ("South Korea", "Seoul"), ("Indonesia", "Jakarta"), ("Switzerland", "Bern"), ("Scotland", "Edinburgh"),
    ("England", "London"), ("Czechia", "Prague"), ("Romania", "Bucharest"), ("Ukraine", "Kyiv"),
]
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"), ("old", "young"),
    ("high", "low"), ("early", "late"), ("strong", "weak"), ("rich", "poor"), ("open", "closed"), ("full", "empty"),
    ("hard", "soft"), ("long", "short"), ("wet", "dry"), ("loud", "quiet"), ("clean", "dirty"), ("first", "last"),
    ("good", "bad"), ("true", "false"), ("up", "down"), ("inside", "outside"), ("day", "night"), ("win", "lose"),
    ("push", "pull"), ("buy", "sell"), ("thick", "thin"), ("heavy", "light"), ("begin", "end"), ("near", "far"),
]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "orange", "purple", "gray"]
NOUNS = ["car", "house", "door", "shirt", "ball", "cup", "bird", "flower", "book", "hat", "chair", "boat", "coat",
         "bag", "kite"]
SYSTEM = "You are a helpful assistant."


def alpaca(instruction, output, inp=None):
    r = {"instruction": instruction}
    if inp is not None:
        r["input"] = inp
    r["output"] = output
    return r


def chat(*turns, system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    for i, t in enumerate(turns):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": t})
    return {"messages": msgs}


def main():
    rng = random.Random(20240521)
    out = []
    for country, city in CAPITALS:  # chat, some with a system turn
        q = rng.choice(["What is the capital of {}?", "Tell me the capital of {}."]).format(country)
        out.append(chat(q, f"The capital of {country} is {city}.", system=SYSTEM if rng.random() < 0.3 else None))
    for country, city in rng.sample(CAPITALS, 30):  # two-turn dialogues
        out.append(chat("Hello!", "Hello! How can I help you today?", f"What is the capital of {country}?",
                        f"The capital of {country} is {city}."))
    pairs = set()
    while len(pairs) < 260:  # arithmetic, Alpaca without input
        op = rng.choice(["plus", "minus", "times"])
        a, b = (rng.randint(1, 10), rng.randint(1, 10)) if op == "times" else (rng.randint(0, 30), rng.randint(0, 30))
        if op == "minus" and b > a:
            a, b = b, a
        pairs.add((a, op, b))
    for a, op, b in sorted(pairs, key=lambda p: rng.random()):
        r = a + b if op == "plus" else a - b if op == "minus" else a * b
        out.append(alpaca(f"What is {a} {op} {b}?", f"{a} {op} {b} is {r}."))
    for _ in range(80):  # Alpaca with input: copy a word from the input
        color, noun = rng.choice(COLORS), rng.choice(NOUNS)
        out.append(alpaca("Which color is mentioned in the sentence?", f"The color is {color}.",
                          f"The {noun} is {color}."))
    for w, o in OPPOSITES:  # both directions
        out.append(alpaca(f"What is the opposite of {w}?", f"The opposite of {w} is {o}."))
        out.append(alpaca(f"What is the opposite of {o}?", f"The opposite of {o} is {w}."))
    rng.shuffle(out)
    path = sys.argv[1] if len(sys.argv) > 1 else "data/sft_sample.jsonl"
    with open(path, "w") as f:
        for r in out:
            f.write(json.dumps(r) + "\n")
    print(f"wrote {len(out)} examples to {path}")


if __name__ == "__main__":
    main()
