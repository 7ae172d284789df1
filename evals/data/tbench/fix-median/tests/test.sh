#!/bin/bash
# reward.json: `reward` = all of the checks passed.
cd /app && python3 /tests/check.py
