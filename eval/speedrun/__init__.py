"""The judge of recipes: `campaign` runs SpeedPLM and ESM2-recipe arms for the same budget, `stats` does the
statistics, `report` writes the tables, `cli` is `python -m eval.speedrun`."""
