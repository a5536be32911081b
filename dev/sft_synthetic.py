#!/usr/bin/env python3
# A longer synthetic instruction set for timing fine-tuning layouts (dev/bench_sft.sh): chat
# records whose prompt is a passage of the Brown corpus and whose response continues it by 1 to
# 12 sentences, so example lengths spread from tens to hundreds of tokens as real SFT data does.
# Deterministic. usage: python3 dev/sft_synthetic.py TEXT_DIR N OUT.jsonl
import glob, json, random, re, sys

text_dir, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sentences = []
for path in sorted(glob.glob(text_dir + "/*.txt")):
    with open(path, encoding="utf-8") as f:
        sentences += [s.strip() for s in re.split(r"(?<=[.!?])\s+", f.read()) if len(s.strip()) > 20]
rng = random.Random(7)
with open(out, "w", encoding="utf-8") as f:
    for _ in range(n):
        i = rng.randrange(len(sentences) - 16)
        k = rng.randint(1, 3)
        m = rng.randint(1, 12)
        prompt = "Continue the text: " + " ".join(sentences[i:i + k])
        reply = " ".join(sentences[i + k:i + k + m])
        f.write(json.dumps({"messages": [{"role": "user", "content": prompt},
                                         {"role": "assistant", "content": reply}]}) + "\n")
