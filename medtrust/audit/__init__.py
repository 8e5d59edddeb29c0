"""The bias, validity and hallucination audit of a generator (RoentGen audit): ``evaluate.py audit=<name>``."""
