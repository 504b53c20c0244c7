"""Twenty varied prompts for greedy-equality checks: code, prose, translation, lists, Q&A."""

PROMPTS = [
    "def quicksort(arr):\n    \"\"\"Sort a list with quicksort.\"\"\"\n",
    "Add type hints to this function:\n\ndef area(width, height):\n    return width * height\n",
    "Refactor this loop into a list comprehension:\n\nresult = []\nfor x in range(10):\n    if x % 2 == 0:\n        result.append(x * x)\n",
    "Write a SQL query that returns the ten most recent orders from the orders table.",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "Explain what a hash map is in two sentences.",
    "Write a haiku about autumn leaves.",
    "Once upon a time, in a small village by the sea,",
    "Translate to French: The weather is beautiful today and we are going to the park.",
    "Translate to German: Where is the train station?",
    "List five fruits that are rich in vitamin C:",
    "Give three tips for writing readable code:\n1.",
    "What is the capital of Australia? Answer in one sentence.",
    "Summarise: The quick brown fox jumps over the lazy dog. The dog did not react. The fox ran away into the forest.",
    "Write a bash one-liner that counts the lines in every .py file in a directory.",
    "#include <stdio.h>\n\nint main(void) {\n",
    "Continue the sequence: 2, 4, 8, 16,",
    "Write a JSON object describing a book with title, author and year.",
    "Dear team,\n\nI am writing to let you know that",
    "import numpy as np\n\ndef normalize(v):\n",
]
