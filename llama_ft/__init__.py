"""llama_ft: fine-tune Llama on CNN/DailyMail with Lightning; ``strategy="advanced"`` picks the parallel layout."""

from llama_ft.data import CNNDailyMailDataModule
from llama_ft.module import LlamaFineTuner
from llama_ft.parallel import AdvancedParallelStrategy

__all__ = ["AdvancedParallelStrategy", "CNNDailyMailDataModule", "LlamaFineTuner"]
