"""The block plan and the memory model it is made from: pure functions of sizes and workers,
tested alone."""
