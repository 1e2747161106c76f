"""Tests of the training application (issue 4)."""
