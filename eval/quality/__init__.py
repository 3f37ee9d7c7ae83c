"""Quality yardsticks: real labelled protein data, fetched by package name and prepared once."""
