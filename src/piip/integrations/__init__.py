"""Optional bridges to other libraries (each imports its library; ``import piip`` imports none)."""
