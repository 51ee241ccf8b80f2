"""Load-test kit: Locust users and the high-density viewer swarm."""
