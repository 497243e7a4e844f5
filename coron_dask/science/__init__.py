"""What astronomers measure on the reduction: sky geometry, photometry and S/N, detection,
contrast curves, and simulated observations of known truth."""
