"""Audits reviewers can trust: group fairness (Fairlearn) and an empirical privacy audit.

Example:
    >>> from hubtune.audit import run_audit
    >>> audit = run_audit("runs/quickstart", policy="default")
    >>> audit["verdict"]["status"]
    'fail'
"""

from hubtune.audit.policy import AuditPolicy, PolicyError, load_policy
from hubtune.audit.runner import AuditError, audit_gate, run_audit

__all__ = [
    "AuditError",
    "AuditPolicy",
    "PolicyError",
    "audit_gate",
    "load_policy",
    "run_audit",
]
