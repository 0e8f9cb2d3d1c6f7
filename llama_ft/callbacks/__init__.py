"""Lightning callbacks the recipes use: throughput, predictions, preemption, peer watchdog."""

from llama_ft.callbacks.predictions import JsonlPredictionWriter
from llama_ft.callbacks.preemption import PreemptionCheckpoint
from llama_ft.callbacks.throughput import TokenThroughputMonitor
from llama_ft.callbacks.watchdog import PeerWatchdog

__all__ = ["JsonlPredictionWriter", "PeerWatchdog", "PreemptionCheckpoint", "TokenThroughputMonitor"]
