"""`python -m moefy` runs the command line (batch jobs start their conversions this way)."""

from moefy.cli import run

run()
