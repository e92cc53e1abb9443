"""Empirical privacy auditing: canaries planted in a simulated run, and what the final model gives away.

`bound` is the one-run epsilon lower bound (Steinke, Nasr and Jagielski 2023; pure numpy/scipy, checked
against jax_privacy's `auditing.py`), `canary` the white-box canary clients and their scores, `exposure`
the black-box canary texts (Carlini et al. 2019), `results` what an audit reports, `settings` the
`[audit]` section. The simulation plants and scores them (`fedtune.simulation.audit`).

Only `settings` is imported here: `fedtune.config` embeds it, and scipy and torch load when an audit runs.
"""

from fedtune.audit.settings import AuditConfig

__all__ = ["AuditConfig"]
