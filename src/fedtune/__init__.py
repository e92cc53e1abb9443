"""fedtune: federated LoRA fine-tuning of language models.

The package follows the data flow of one round:
config -> data partition -> client local training -> update -> server aggregation
-> global adapter -> evaluation and report.
"""

__version__ = "0.1.0"
