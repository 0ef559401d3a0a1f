"""The training modes: one list for the recipe (`coconut.mode`), the curriculum and the exports.

What each mode trains is described where it is built, in data/curriculum.py. The model wing holds the list because
an export's coconut_config.json names its mode and the model wing reads exports.
"""

MODES = ("coconut", "cot", "no_cot", "no_thoughts", "pause_as_thought")
STAGE0_MODES = ("cot", "no_cot")  # language-only modes that never leave stage 0
