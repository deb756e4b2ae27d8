# The seed guide's runtime error: ZeroDivisionError when value is 0.
import json

with open("/input/data.json") as f:
    data = json.load(f)
result = 100 / data["value"]
