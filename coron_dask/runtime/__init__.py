"""Where and how a graph runs: deployment (LocalCluster, a running scheduler, batch jobs),
execution and cancellation, progress, worker set-up, system resources, signals."""
