"""Quality yardsticks a protein LM is judged by, each on real data installed by package name and each beside its
random-init twin and a trivial baseline: zero-shot variant effects (dms + eval/zeroshot.py), contacts from
attention (contacts_data, contacts), secondary structure and fold (structure_data, secondary_structure, fold).
"""
