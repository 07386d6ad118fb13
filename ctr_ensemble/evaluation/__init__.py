"""Scoring a repository through every backend against the offline reference (evaluate), and check-export."""
