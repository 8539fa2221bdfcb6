"""Names of the files in a run directory that several stages read and write.

One place for the names, so a stage that writes a file and the stages that read it cannot
drift apart.
"""

from __future__ import annotations

__all__ = ["PRIVACY_FILE"]

# The privacy ledger stored beside the saved weights: further DP training of those weights adds
# to its ε (hubtune reads it as the prior history of a base model).
PRIVACY_FILE = "hubtune_privacy.json"
