"""Recipe defaults that torch-free code needs too: ``llama-ft plan`` without a recipe plans what ``fit`` would run.

``CNNDailyMailDataModule``'s signature takes its defaults from here. Lightning's ``Trainer`` defaults are Lightning's:
the ones a plan reads are mirrored here, and tests check them against ``Trainer.__init__`` and a built ``Trainer``.
"""

DATASET = "abisee/cnn_dailymail"
MAX_LENGTH = 1024
GLOBAL_BATCH_SIZE = 256
MICRO_BATCH_SIZE = 1
BATCHING = "length_grouped"

# ``Trainer.__init__``'s defaults for the arguments a plan reads, as LightningCLI parses them when a recipe is silent.
TRAINER_ARGUMENTS = {"precision": None, "num_nodes": 1, "devices": "auto", "strategy": "auto"}
TRAINER_PRECISION = "32-true"  # what a Trainer runs when its precision argument is None
