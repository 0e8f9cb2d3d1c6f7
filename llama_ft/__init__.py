"""llama_ft: fine-tune Llama on CNN/DailyMail with Lightning."""
