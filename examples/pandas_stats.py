# Needs the data-processing job type (pandas and numpy); fails with import_error in default.
import json

import pandas as pd

with open("/input/data.json") as f:
    frame = pd.DataFrame(json.load(f)["rows"])
print(frame.describe())
with open("/output/result.json", "w") as f:
    json.dump({"mean": frame.mean(numeric_only=True).to_dict()}, f)
