"""CNN/DailyMail data: sources, prompt template, batching and the LightningDataModule."""

from llama_ft.data.datamodule import CNNDailyMailDataModule

__all__ = ["CNNDailyMailDataModule"]
