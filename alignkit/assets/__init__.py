"""Files alignkit ships: demo data, prompt sets, the default constitution, toy rewards."""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
PROMPTS_DIR = ASSETS_DIR / "prompts"
