"""Plots and the HTML run report."""
