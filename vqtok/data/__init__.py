"""Image datasets (listing, robust decoding, ADM crops), the bundled demo photos, and token shards."""
