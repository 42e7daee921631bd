"""Passerelle: move machine-learning models between hospitals without moving patients.

This package holds the command line (``passerelle.cli``), the synthetic PMSI corpus
(``passerelle.corpus``) and what the three parts share (errors, digests). The parts
themselves are the top-level packages ``registry`` (source side), ``adapters``
(frameworks and ONNX) and ``transfer`` (sites, bundles, ledger).
"""

__version__ = "0.1.0"
