# Reads its input from /input/data.json and writes its output to /output/result.json.
import json
from collections import Counter

with open("/input/data.json") as f:
    data = json.load(f)

counts = Counter(data["text"].lower().split())
print(f"{sum(counts.values())} words, {len(counts)} distinct")
with open("/output/result.json", "w") as f:
    json.dump({"top": counts.most_common(3)}, f)
