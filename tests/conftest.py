import os
import sys

# Test modules in sub-folders import the shared helpers as `helpers`.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
