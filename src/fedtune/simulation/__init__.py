"""`fedtune run`: a federated run simulated on one machine (`run`), its clients trained one after another
or by a pool of workers (`workers`)."""

from fedtune.simulation.run import (
    Observer,
    RunResult,
    Setup,
    Silent,
    run_setup,
    setup,
    simulate,
    total_steps,
)

__all__ = ["Observer", "RunResult", "Setup", "Silent", "run_setup", "setup", "simulate", "total_steps"]
