"""What makes an answer right: JSON-schema checks and scoring metrics."""
