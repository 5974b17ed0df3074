"""Node programs: the coordinator and worker agent processes, and the LocalCluster launcher."""
