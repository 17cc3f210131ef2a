"""Importers: an nnU-Net v2 results folder or a MONAI bundle → a format 2 model package.

Run offline, in the ``import`` extra's environment (torch, nnunetv2, monai): their own
code rebuilds each network, exports it to ONNX with static shapes, and makes the golden
case the node must reproduce before the package serves. The serving path never imports
this package (an import-linter contract in ``pyproject.toml``); what it writes is an
ordinary format 2 package (:mod:`dicomnode.modelpkg.format2`).

What an importer cannot express in format 2 it refuses with the reason
(:class:`~dicomnode.errors.ImportRefused`): cascades, custom trainers whose code is not
importable, several input series, ``Lambda`` transforms, custom bundle code.
"""

from __future__ import annotations

__all__ = ["ImportReport"]

from dicomnode.importers.common import ImportReport
