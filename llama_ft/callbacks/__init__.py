"""Lightning callbacks the recipes use: throughput, predictions, preemption, peer watchdog, step progress bar."""

from llama_ft.callbacks.predictions import JsonlPredictionWriter
from llama_ft.callbacks.preemption import PreemptionCheckpoint
from llama_ft.callbacks.progress import StepProgressBar
from llama_ft.callbacks.throughput import TokenThroughputMonitor
from llama_ft.callbacks.watchdog import PeerWatchdog

__all__ = ["JsonlPredictionWriter", "PeerWatchdog", "PreemptionCheckpoint", "StepProgressBar", "TokenThroughputMonitor"]
