"""Multi-host tests: lepton programs in Linux network namespaces, with partitions."""
