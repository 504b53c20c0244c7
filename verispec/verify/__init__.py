"""Verification: which drafted tokens the target accepts (rejection sampling), and tree structure."""
