"""Quality yardsticks."""
