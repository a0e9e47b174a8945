"""Examples of extending fedsqueeze with your own code.

See docs/running-simulations.md, "Bring your own task".
"""
