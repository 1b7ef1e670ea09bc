"""The data path: source -> contract -> batch -> sink -> commit, wired by the worker loop."""
