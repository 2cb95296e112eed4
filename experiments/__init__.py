"""Experiments: clients of ``apm`` run as ``python -m experiments.NAME`` from the repository root;
``common`` holds what they share."""
