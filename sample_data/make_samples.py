"""Regenerate the sample data sets in this folder (deterministic: same files every run).

    /work/venv/bin/python sample_data/make_samples.py

The facts are typed in tables below and every arithmetic or conversion answer is computed, so
the reference answers are correct by construction. Needs pyarrow for the Parquet twins.
"""

from __future__ import annotations

import csv
import json
import random
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
# The package's copies, which `batchrunner samples DIR` writes for users with no checkout
# (tests/test_samples.py checks that they are the same bytes as these).
PACKAGE_SAMPLES = HERE.parent / "batchrunner" / "samples"

# --- prompts: the quick-start set ---------------------------------------------------------------

PROMPTS: list[tuple[str, str]] = [
    ("explanation", "Explain the difference between a process and a thread in two short paragraphs."),
    ("explanation", "Why is the sky blue? Answer for a curious ten-year-old."),
    ("explanation", "What does a DNS resolver do when I type a web address into my browser?"),
    ("explanation", "Explain compound interest with a worked example using $1,000 at 5% for 3 years."),
    ("explanation", "What is the difference between weather and climate?"),
    ("explanation", "In plain language, what is a p-value and what is it not?"),
    ("explanation", "How do vaccines train the immune system?"),
    ("coding", "Write a Python function that checks whether a string is a palindrome, ignoring case and punctuation."),
    ("coding", "Show how to read a CSV file with pandas and print the mean of every numeric column."),
    ("coding", "Write a SQL query that returns the five customers with the highest total order value."),
    ("coding", "What does `git rebase -i HEAD~3` do? Give a short example."),
    ("coding", "Convert this loop to a list comprehension: result = []\nfor x in range(10):\n    if x % 2 == 0:\n        result.append(x * x)"),
    ("coding", "Write a bash one-liner that counts the lines of every .py file under the current folder."),
    ("coding", "Explain what a race condition is and show a minimal Python example of one."),
    ("summarization", "Summarize the plot of Romeo and Juliet in three sentences."),
    ("summarization", "Summarize the main causes of the French Revolution in a bulleted list of at most five items."),
    ("summarization", "Give a one-paragraph summary of how photosynthesis works."),
    ("summarization", "Summarize this note in one sentence: 'The quarterly review moved from Tuesday to Thursday because the finance team needs two more days to close the books. The agenda is unchanged; please send slides by Wednesday noon.'"),
    ("summarization", "Summarize the key ideas of the theory of evolution by natural selection for a high-school student."),
    ("writing", "Write a polite email declining a meeting invitation because of a scheduling conflict, and propose two alternative times."),
    ("writing", "Write a haiku about the first snow of winter."),
    ("writing", "Draft a short apology to customers for a two-hour service outage."),
    ("writing", "Write the opening paragraph of a mystery novel set in a lighthouse."),
    ("writing", "Write a limerick about a cat who learns to code."),
    ("writing", "Write a thank-you note to a colleague who helped you prepare a presentation."),
    ("writing", "Write a 100-word product update announcing dark mode in a note-taking app."),
    ("brainstorming", "Suggest five names for a neighborhood bakery that specializes in sourdough."),
    ("brainstorming", "Give me ten ideas for a rainy-day activity with two kids aged 6 and 9."),
    ("brainstorming", "List six ways a small team can reduce the number of meetings without losing alignment."),
    ("brainstorming", "What are some good questions to ask at the end of a job interview?"),
    ("brainstorming", "Propose three themes for a company hackathon focused on sustainability."),
    ("brainstorming", "Suggest a one-week vegetarian dinner plan with a shopping list."),
    ("translation", "Translate into French: 'The train to Lyon leaves at half past eight from platform four.'"),
    ("translation", "Translate into Spanish: 'Could you recommend a quiet restaurant near the old town?'"),
    ("translation", "Translate into German: 'Please remember to switch off the lights when you leave the office.'"),
    ("translation", "Translate into English: 'Il pleut depuis ce matin, mais le concert aura lieu quand même.'"),
    ("translation", "Translate into Italian: 'We would like to book a table for four people on Saturday evening.'"),
    ("math", "A shirt costs $40 after a 20% discount. What was the original price? Show your reasoning."),
    ("math", "What is the probability of rolling a sum of 7 with two fair six-sided dice?"),
    ("math", "Solve for x: 3x + 7 = 25."),
    ("math", "A train travels 180 km in 2 hours 15 minutes. What is its average speed in km/h?"),
    ("math", "How many different ways can 5 books be arranged on a shelf?"),
    ("math", "Is 221 a prime number? Explain briefly."),
    ("classification", "Classify the sentiment of this review as positive, negative or mixed: 'The battery lasts forever, but the screen scratches far too easily.'"),
    ("classification", "Which of these are fruits and which are vegetables: tomato, carrot, apple, spinach, cucumber?"),
    ("classification", "Label this support ticket as billing, technical or account: 'I was charged twice for my March subscription.'"),
    ("classification", "Is this sentence formal or informal? 'Hey, can u send me the file asap?'"),
    ("classification", "Classify the following email subject as spam or not spam: 'Congratulations! You have been selected for a free cruise'"),
    ("advice", "What should I check before buying a used bicycle?"),
    ("advice", "How can I prepare for a 10 km run in eight weeks if I currently run 3 km twice a week?"),
]

# --- eval questions: general knowledge with reference answers ---------------------------------------

CAPITALS: list[tuple[str, str]] = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("the Netherlands", "Amsterdam"), ("Belgium", "Brussels"),
    ("Austria", "Vienna"), ("Poland", "Warsaw"), ("the Czech Republic", "Prague"),
    ("Hungary", "Budapest"), ("Greece", "Athens"), ("Sweden", "Stockholm"), ("Norway", "Oslo"),
    ("Denmark", "Copenhagen"), ("Finland", "Helsinki"), ("Iceland", "Reykjavik"),
    ("Ireland", "Dublin"), ("the United Kingdom", "London"), ("Romania", "Bucharest"),
    ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"), ("Croatia", "Zagreb"), ("Ukraine", "Kyiv"),
    ("Turkey", "Ankara"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Nigeria", "Abuja"),
    ("Ethiopia", "Addis Ababa"), ("Morocco", "Rabat"), ("Ghana", "Accra"), ("Senegal", "Dakar"),
    ("Algeria", "Algiers"), ("Tunisia", "Tunis"), ("Japan", "Tokyo"), ("China", "Beijing"),
    ("South Korea", "Seoul"), ("India", "New Delhi"), ("Pakistan", "Islamabad"),
    ("Bangladesh", "Dhaka"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
    ("the Philippines", "Manila"), ("Mongolia", "Ulaanbaatar"), ("Nepal", "Kathmandu"),
    ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Saudi Arabia", "Riyadh"), ("Jordan", "Amman"),
    ("Kazakhstan", "Astana"), ("Uzbekistan", "Tashkent"), ("Canada", "Ottawa"),
    ("the United States", "Washington, D.C."), ("Mexico", "Mexico City"), ("Cuba", "Havana"),
    ("Brazil", "Brasília"), ("Argentina", "Buenos Aires"), ("Chile", "Santiago"),
    ("Peru", "Lima"), ("Colombia", "Bogotá"), ("Venezuela", "Caracas"), ("Ecuador", "Quito"),
    ("Uruguay", "Montevideo"), ("Paraguay", "Asunción"), ("Australia", "Canberra"),
    ("New Zealand", "Wellington"), ("Russia", "Moscow"), ("Lithuania", "Vilnius"),
    ("Latvia", "Riga"), ("Estonia", "Tallinn"), ("Slovakia", "Bratislava"),
    ("Slovenia", "Ljubljana"), ("Georgia", "Tbilisi"), ("Armenia", "Yerevan"),
]
CAPITAL_FORMS = [
    "What is the capital of {country}?",
    "Which city is the capital of {country}?",
    "Name the capital city of {country}.",
]
REVERSE_CAPITALS = ["Canberra", "Ottawa", "Ankara", "Brasília", "Abuja", "Wellington",
                    "Bern", "Reykjavik", "Nairobi", "Hanoi"]
# Bern is the federal city of Switzerland; it is only asked about in the reverse direction.
CAPITAL_OF = {capital: country for country, capital in CAPITALS} | {"Bern": "Switzerland"}

ELEMENTS: list[tuple[str, str, int]] = [
    ("hydrogen", "H", 1), ("helium", "He", 2), ("lithium", "Li", 3), ("beryllium", "Be", 4),
    ("boron", "B", 5), ("carbon", "C", 6), ("nitrogen", "N", 7), ("oxygen", "O", 8),
    ("fluorine", "F", 9), ("neon", "Ne", 10), ("sodium", "Na", 11), ("magnesium", "Mg", 12),
    ("aluminium", "Al", 13), ("silicon", "Si", 14), ("phosphorus", "P", 15),
    ("sulfur", "S", 16), ("chlorine", "Cl", 17), ("argon", "Ar", 18), ("potassium", "K", 19),
    ("calcium", "Ca", 20), ("titanium", "Ti", 22), ("chromium", "Cr", 24),
    ("manganese", "Mn", 25), ("iron", "Fe", 26), ("cobalt", "Co", 27), ("nickel", "Ni", 28),
    ("copper", "Cu", 29), ("zinc", "Zn", 30), ("krypton", "Kr", 36), ("silver", "Ag", 47),
    ("tin", "Sn", 50), ("iodine", "I", 53), ("xenon", "Xe", 54), ("tungsten", "W", 74),
    ("platinum", "Pt", 78), ("gold", "Au", 79), ("mercury", "Hg", 80), ("lead", "Pb", 82),
    ("radon", "Rn", 86), ("uranium", "U", 92),
]

SCIENCE: list[tuple[str, str]] = [
    ("Which planet is closest to the Sun?", "Mercury"),
    ("What is the largest planet in the Solar System?", "Jupiter"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("How many planets are there in the Solar System?", "8"),
    ("Which planet is the farthest from the Sun?", "Neptune"),
    ("Which planet is best known for its prominent ring system?", "Saturn"),
    ("What is the nearest star to Earth?", "The Sun"),
    ("Roughly how long does sunlight take to reach Earth?", "About 8 minutes (8 min 20 s)"),
    ("What gas do plants take in from the air for photosynthesis?", "Carbon dioxide"),
    ("What is the chemical formula of water?", "H2O"),
    ("What is the chemical formula of table salt?", "NaCl"),
    ("At what temperature in degrees Celsius does water boil at sea level?", "100 °C"),
    ("At what temperature in degrees Fahrenheit does water freeze?", "32 °F"),
    ("What is absolute zero in degrees Celsius?", "-273.15 °C"),
    ("What is the pH of pure water at 25 °C?", "7"),
    ("Which organelle is known as the powerhouse of the cell?", "The mitochondrion"),
    ("How many bones are there in the adult human body?", "206"),
    ("How many chambers does the human heart have?", "4"),
    ("What is the largest organ of the human body?", "The skin"),
    ("What is the longest bone in the human body?", "The femur"),
    ("Which blood cells carry oxygen around the body?", "Red blood cells"),
    ("Which vitamin does the skin make when exposed to sunlight?", "Vitamin D"),
    ("What does DNA stand for?", "Deoxyribonucleic acid"),
    ("What is the hardest naturally occurring substance?", "Diamond"),
    ("What is the most abundant gas in Earth's atmosphere?", "Nitrogen"),
    ("Which subatomic particle carries a negative electric charge?", "The electron"),
    ("What is the SI unit of force?", "The newton (N)"),
    ("What is the SI unit of electric current?", "The ampere (A)"),
    ("What is the SI unit of energy?", "The joule (J)"),
    ("What is the SI unit of power?", "The watt (W)"),
    ("What is the speed of light in a vacuum, in kilometres per second, approximately?",
     "About 300,000 km/s (299,792.458 km/s)"),
    ("Who proposed the general theory of relativity?", "Albert Einstein"),
    ("Who formulated the three laws of motion and the law of universal gravitation?",
     "Isaac Newton"),
    ("What force keeps the planets in orbit around the Sun?", "Gravity"),
]

GENERAL: list[tuple[str, str, str]] = [
    ("literature", "Who wrote \"Romeo and Juliet\"?", "William Shakespeare"),
    ("literature", "Who wrote \"Pride and Prejudice\"?", "Jane Austen"),
    ("literature", "Who wrote \"War and Peace\"?", "Leo Tolstoy"),
    ("literature", "Who wrote \"One Hundred Years of Solitude\"?", "Gabriel García Márquez"),
    ("literature", "Who wrote the novel \"1984\"?", "George Orwell"),
    ("literature", "Who wrote \"Don Quixote\"?", "Miguel de Cervantes"),
    ("literature", "Who wrote \"The Odyssey\", according to tradition?", "Homer"),
    ("art", "Who painted the Mona Lisa?", "Leonardo da Vinci"),
    ("art", "Who painted \"The Starry Night\"?", "Vincent van Gogh"),
    ("art", "Who composed the \"Moonlight\" Sonata?", "Ludwig van Beethoven"),
    ("art", "Who composed \"The Magic Flute\"?", "Wolfgang Amadeus Mozart"),
    ("history", "In which year did the Second World War end?", "1945"),
    ("history", "In which year did humans first land on the Moon?", "1969"),
    ("history", "Who was the first person to walk on the Moon?", "Neil Armstrong"),
    ("history", "In which year did the Berlin Wall fall?", "1989"),
    ("history", "Who was the first President of the United States?", "George Washington"),
    ("history", "In which year did Christopher Columbus first reach the Americas?", "1492"),
    ("general", "How many continents are there, by the most common convention?", "7"),
    ("general", "How many days are there in a leap year?", "366"),
    ("general", "How many sides does a hexagon have?", "6"),
    ("general", "What is the smallest prime number?", "2"),
    ("general", "How many strings does a standard violin have?", "4"),
    ("general", "How many players does a football (soccer) team have on the pitch?", "11"),
    ("general", "What is the currency of Japan?", "The yen"),
    ("general", "What is the currency of the United Kingdom?", "The pound sterling"),
    ("general", "What is the currency of Switzerland?", "The Swiss franc"),
    ("general", "What is the currency of India?", "The Indian rupee"),
    ("general", "What is the official language of Brazil?", "Portuguese"),
    ("general", "How many hours are there in a week?", "168"),
    ("general", "How many keys does a standard piano have?", "88"),
]

GEOGRAPHY: list[tuple[str, str]] = [
    ("What is the largest ocean on Earth?", "The Pacific Ocean"),
    ("What is the tallest mountain above sea level?", "Mount Everest"),
    ("What is the largest country by area?", "Russia"),
    ("What is the largest continent by area?", "Asia"),
    ("What is the smallest continent by area?", "Australia"),
    ("What is the largest hot desert in the world?", "The Sahara"),
    ("Which river flows through Paris?", "The Seine"),
    ("Which river flows through London?", "The Thames"),
    ("Which river flows through both Vienna and Budapest?", "The Danube"),
    ("What is the highest uninterrupted waterfall in the world?", "Angel Falls"),
    ("What is the largest lake in the world by surface area?", "The Caspian Sea"),
    ("What is the longest continental mountain range?", "The Andes"),
    ("In which country is Machu Picchu?", "Peru"),
    ("In which country is Mount Kilimanjaro?", "Tanzania"),
    ("Which strait separates Spain from Morocco?", "The Strait of Gibraltar"),
    ("What is the largest island in the world?", "Greenland"),
    ("What is the deepest oceanic trench?", "The Mariana Trench"),
    ("In which country is Uluru?", "Australia"),
    ("In which country are the pyramids of Giza?", "Egypt"),
    ("In which city is the Colosseum?", "Rome"),
    ("Which ocean lies between Africa and Australia?", "The Indian Ocean"),
]


def number(x: float) -> str:
    """12.0 -> '12', 30.48 -> '30.48', 1609.344 -> '1609.34': no float noise, no separators."""
    return f"{x:.2f}".rstrip("0").rstrip(".")


def arithmetic(rng: random.Random) -> list[tuple[str, str]]:
    items: dict[str, str] = {}

    def add(question: str, answer: float) -> None:
        items.setdefault(question, number(answer))

    while len(items) < 14:
        a, b = rng.randint(12, 999), rng.randint(12, 999)
        add(rng.choice(["What is {a} + {b}?", "Add {a} and {b}.", "What is the sum of {a} and {b}?"]).format(a=a, b=b), a + b)
    while len(items) < 26:
        a, b = rng.randint(100, 2000), rng.randint(10, 99)
        add(rng.choice(["What is {a} - {b}?", "Subtract {b} from {a}."]).format(a=a, b=b), a - b)
    while len(items) < 40:
        a, b = rng.randint(6, 99), rng.randint(3, 25)
        add(rng.choice(["What is {a} × {b}?", "Multiply {a} by {b}.", "What is {a} times {b}?"]).format(a=a, b=b), a * b)
    while len(items) < 50:
        b, q = rng.randint(3, 19), rng.randint(4, 60)
        add(rng.choice(["What is {a} divided by {b}?", "What is {a} ÷ {b}?"]).format(a=b * q, b=b), q)
    while len(items) < 58:
        pct, base = rng.choice([5, 10, 15, 20, 25, 30, 40, 50, 75]), rng.randint(2, 40) * 20
        add(f"What is {pct}% of {base}?", pct * base / 100)
    while len(items) < 64:
        n = rng.randint(11, 35)
        add(f"What is {n} squared?", n * n)
    while len(items) < 70:
        n = rng.randint(4, 30)
        add(f"What is the square root of {n * n}?", n)
    return list(items.items())


def conversions(rng: random.Random) -> list[tuple[str, str]]:
    tables: list[tuple[str, list[int], Any]] = [
        ("How many metres are there in {v} kilometres?", [2, 3, 7, 12, 42], lambda v: f"{number(v * 1000)} m"),
        ("How many grams are there in {v} kilograms?", [2, 5, 8, 15], lambda v: f"{number(v * 1000)} g"),
        ("How many millilitres are there in {v} litres?", [2, 4, 6], lambda v: f"{number(v * 1000)} mL"),
        ("How many minutes are there in {v} hours?", [3, 5, 8, 24], lambda v: f"{number(v * 60)} minutes"),
        ("How many seconds are there in {v} minutes?", [4, 10, 15], lambda v: f"{number(v * 60)} seconds"),
        ("How many hours are there in {v} days?", [3, 7, 30], lambda v: f"{number(v * 24)} hours"),
        ("What is {v} °C in degrees Fahrenheit?", [-40, -10, 0, 20, 25, 35, 100], lambda v: f"{number(v * 9 / 5 + 32)} °F"),
        ("What is {v} °F in degrees Celsius?", [50, 68, 86, 212], lambda v: f"{number((v - 32) * 5 / 9)} °C"),
        ("How many centimetres are there in {v} inches?", [4, 10, 12, 36], lambda v: f"{number(v * 2.54)} cm"),
        ("Roughly how many kilometres are there in {v} miles?", [5, 10, 26, 100], lambda v: f"About {number(v * 1.609344)} km"),
        ("How many inches are there in {v} feet?", [3, 6, 10], lambda v: f"{number(v * 12)} inches"),
        ("How many ounces are there in {v} pounds?", [2, 5], lambda v: f"{number(v * 16)} ounces"),
        ("How many feet are there in {v} yards?", [4, 100], lambda v: f"{number(v * 3)} feet"),
    ]
    return [(form.format(v=v), answer(v)) for form, values, answer in tables for v in values]


def eval_questions() -> list[dict[str, str]]:
    rng = random.Random(20240611)
    rows: list[tuple[str, str, str]] = []
    for i, (country, capital) in enumerate(CAPITALS):
        rows.append(("geography", CAPITAL_FORMS[i % len(CAPITAL_FORMS)].format(country=country), capital))
    for capital in REVERSE_CAPITALS:
        country = CAPITAL_OF[capital]
        rows.append(("geography", f"{capital} is the capital of which country?", country[4:] if country.startswith("the ") else country))
    rows += [("geography", q, a) for q, a in GEOGRAPHY]
    rows += [("arithmetic", q, a) for q, a in arithmetic(rng)]
    for i, (name, symbol, z) in enumerate(ELEMENTS):
        kind = i % 3
        if kind == 0:
            rows.append(("chemistry", f"What is the chemical symbol for {name}?", symbol))
        elif kind == 1:
            rows.append(("chemistry", f"Which element has the chemical symbol {symbol}?", name.capitalize()))
        else:
            rows.append(("chemistry", f"What is the atomic number of {name}?", str(z)))
    rows += [("unit conversion", q, a) for q, a in conversions(rng)]
    rows += [("science", q, a) for q, a in SCIENCE]
    rows += [(topic, q, a) for topic, q, a in GENERAL]
    assert len({q for _, q, _ in rows}) == len(rows), "duplicate question"
    rng.shuffle(rows)
    return [
        {"id": f"q{i:04d}", "question": q, "reference": a, "topic": topic}
        for i, (topic, q, a) in enumerate(rows, 1)
    ]


# --- generation: products x audiences -----------------------------------------------------------

PRODUCTS: list[tuple[str, str]] = [
    ("a stainless-steel insulated water bottle", "outdoors"),
    ("a lightweight two-person backpacking tent", "outdoors"),
    ("a solar-powered camping lantern", "outdoors"),
    ("a waterproof trail-running shoe", "outdoors"),
    ("a packable down jacket", "outdoors"),
    ("a noise-cancelling wireless headphone set", "electronics"),
    ("a compact mechanical keyboard", "electronics"),
    ("a 27-inch 4K monitor", "electronics"),
    ("a smart thermostat", "electronics"),
    ("a portable power bank with USB-C fast charging", "electronics"),
    ("an e-reader with a warm front light", "electronics"),
    ("a fitness tracker with sleep monitoring", "electronics"),
    ("a cast-iron skillet", "kitchen"),
    ("a burr coffee grinder", "kitchen"),
    ("a glass pour-over coffee maker", "kitchen"),
    ("a set of beeswax food wraps", "kitchen"),
    ("a countertop sourdough starter kit", "kitchen"),
    ("a programmable slow cooker", "kitchen"),
    ("a bamboo cutting board set", "kitchen"),
    ("an ergonomic office chair", "home office"),
    ("a height-adjustable standing desk", "home office"),
    ("a dimmable LED desk lamp", "home office"),
    ("a leather-bound weekly planner", "home office"),
    ("a refillable fountain pen", "home office"),
    ("a linen duvet cover", "home"),
    ("a set of blackout curtains", "home"),
    ("a cordless stick vacuum", "home"),
    ("a HEPA air purifier", "home"),
    ("a self-watering herb planter", "home"),
    ("a weighted blanket", "home"),
    ("a yoga mat with alignment lines", "fitness"),
    ("an adjustable dumbbell set", "fitness"),
    ("a foam roller for muscle recovery", "fitness"),
    ("a jump rope with ball bearings", "fitness"),
    ("a wooden building-block set", "kids"),
    ("a beginner's telescope", "kids"),
    ("a kids' bike helmet with LED lights", "kids"),
    ("a picture book about ocean animals", "kids"),
    ("an organic cotton baby blanket", "kids"),
    ("a 1000-piece jigsaw puzzle of a mountain lake", "games"),
    ("a cooperative board game for two to four players", "games"),
    ("a hardshell carry-on suitcase", "travel"),
    ("a memory-foam travel pillow", "travel"),
    ("a universal travel adapter", "travel"),
    ("a slim RFID-blocking wallet", "travel"),
    ("a grooming kit for long-haired dogs", "pets"),
    ("an automatic cat feeder", "pets"),
    ("a reflective dog harness", "pets"),
]
AUDIENCES: dict[str, list[str]] = {
    "outdoors": ["outdoor enthusiasts", "weekend hikers", "first-time campers", "trail runners",
                 "gift shoppers"],
    "electronics": ["remote workers", "college students", "gamers", "first-time buyers",
                    "gift shoppers", "retirees"],
    "kitchen": ["home cooks", "professional chefs", "coffee lovers", "eco-minded consumers",
                "busy parents", "newlyweds"],
    "home office": ["remote workers", "small-business owners", "college students", "writers"],
    "home": ["city apartment dwellers", "busy parents", "eco-minded consumers",
             "allergy sufferers", "new homeowners"],
    "fitness": ["gym beginners", "busy professionals", "runners", "retirees",
                "home-workout fans"],
    "kids": ["busy parents", "grandparents", "teachers", "gift shoppers"],
    "games": ["families", "puzzle fans", "gift shoppers", "couples"],
    "travel": ["frequent flyers", "backpackers", "business travellers", "gift shoppers"],
    "pets": ["pet owners", "first-time pet owners", "busy professionals", "gift shoppers"],
}
TONES = ["friendly", "professional", "playful", "concise", "warm"]
CHANNELS = ["web shop", "marketplace listing", "newsletter", "social post"]


def generation() -> list[dict[str, str]]:
    rng = random.Random(7)
    pairs = [(p, c, a) for p, c in PRODUCTS for a in AUDIENCES[c]]
    rng.shuffle(pairs)
    chosen = sorted(pairs[:200], key=lambda t: (t[1], t[0], t[2]))
    return [
        {
            "id": f"gen-{i:03d}",
            "product": product,
            "category": category,
            "audience": audience,
            "tone": rng.choice(TONES),
            "channel": rng.choice(CHANNELS),
        }
        for i, (product, category, audience) in enumerate(chosen, 1)
    ]


# --- conversations: a messages column -----------------------------------------------------------

CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "What's a good name for a grey kitten?"}],
    [{"role": "system", "content": "You are a terse assistant. Answer in one sentence."},
     {"role": "user", "content": "Why do leaves change colour in autumn?"}],
    [{"role": "user", "content": "I want to learn to cook. Where should I start?"},
     {"role": "assistant", "content": "Start with a few basics: eggs, rice, a soup and a stir-fry."},
     {"role": "user", "content": "Give me a simple stir-fry recipe for two."}],
    [{"role": "user", "content": "Translate 'good morning' into Japanese."}],
    [{"role": "system", "content": "You review Python code and point out bugs only."},
     {"role": "user", "content": "def mean(xs):\n    return sum(xs) / len(xs) if xs else 0\n\nprint(mean([]))"}],
    [{"role": "user", "content": "Plan a two-day trip to Lisbon."},
     {"role": "assistant", "content": "Day 1: Alfama, the castle and a fado dinner. Day 2: Belém and LX Factory."},
     {"role": "user", "content": "Swap day 2 for something outside the city."}],
    [{"role": "user", "content": "What is the difference between 'affect' and 'effect'?"}],
    [{"role": "user", "content": "Write a SQL query to count orders per day."},
     {"role": "assistant", "content": "SELECT order_date, COUNT(*) FROM orders GROUP BY order_date;"},
     {"role": "user", "content": "Now only for the last 30 days, in PostgreSQL."}],
]


def batch_api() -> list[dict[str, Any]]:
    prompts = [p for _, p in PROMPTS[::5]]
    return [
        {
            "custom_id": f"request-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "gpt-4o-mini" if i % 3 else "gpt-4o",
                "messages": [
                    {"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": prompt},
                ],
                "max_tokens": 300,
            },
        }
        for i, prompt in enumerate(prompts, 1)
    ]


# --- scored evaluations: multiple choice and short-answer arithmetic ----------------------------
# Questions whose answers the gateway simulator can work out (batchrunner/gateway/evals.py), so
# that `--local` runs score differently per model. References are computed, so always right.

WORDS = ["apple", "banana", "cherry", "dolphin", "elephant", "falcon", "giraffe", "harbor",
         "island", "jungle", "kettle", "lantern", "meadow", "needle", "orchard", "pepper",
         "quartz", "rabbit", "saddle", "tunnel", "umbrella", "velvet", "walnut", "yogurt", "zebra",
         "anchor", "basket", "candle", "desert", "engine", "forest", "garden", "hammer", "insect"]
CHOICE_MARK = "Answer with the letter of the correct option."


def _options(rng: random.Random, right: str, wrong: list[str]) -> tuple[list[str], str]:
    """Four options (the right one at a random place) and the right one's letter."""
    options = [right, *wrong[:3]]
    rng.shuffle(options)
    return options, "ABCD"[options.index(right)]


def multiple_choice() -> list[dict[str, str]]:
    rng = random.Random(1515)
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    while len(rows) < 300:
        kind = ["sum", "prime", "largest", "alphabet", "length"][len(rows) % 5]
        if kind == "sum":
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            question = f"What is {a} + {b}?"
            right = a + b
            wrong = rng.sample([right + d for d in (-11, -10, -2, -1, 1, 2, 9, 10)], 3)
            options, letter = _options(rng, str(right), [str(w) for w in wrong])
        elif kind == "prime":
            primes = [n for n in range(11, 200) if all(n % d for d in range(2, int(n**0.5) + 1))]
            composites = [n for n in range(11, 200) if n % 2 and n not in primes]
            question = "Which of these numbers is prime?"
            options, letter = _options(
                rng, str(rng.choice(primes)), [str(n) for n in rng.sample(composites, 3)]
            )
        elif kind == "largest":
            values = rng.sample(range(100, 999), 4)
            texts = [f"{v / 100:.2f}" for v in values]
            question = "Which of these numbers is the largest?"
            top = texts[values.index(max(values))]
            options, letter = _options(rng, top, [t for t in texts if t != top])
        elif kind == "alphabet":
            words = rng.sample(WORDS, 4)
            question = "Which word comes first in alphabetical order?"
            first = min(words)
            options, letter = _options(rng, first, [w for w in words if w != first])
        else:
            word = rng.choice(WORDS)
            n = len(word)
            question = f"How many letters are in the word '{word}'?"
            wrong = rng.sample([m for m in range(3, 12) if m != n], 3)
            options, letter = _options(rng, str(n), [str(m) for m in wrong])
        text = "\n".join([question, *(f"{'ABCD'[i]}) {o}" for i, o in enumerate(options)),
                         CHOICE_MARK])
        if text in seen:
            continue
        seen.add(text)
        rows.append({"id": f"mc{len(rows) + 1:04d}", "question": text, "reference": letter,
                     "topic": kind})
    return rows


def short_arithmetic() -> list[dict[str, str]]:
    rng = random.Random(1516)
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    while len(rows) < 300:
        op = "+-×÷"[len(rows) % 4]
        if op == "+":
            a, b = rng.randint(100, 99_999), rng.randint(100, 99_999)
            value = a + b
        elif op == "-":
            a, b = rng.randint(100, 9_999), rng.randint(100, 19_999)
            value = a - b  # negative about half the time
        elif op == "×":
            a, b = rng.randint(12, 999), rng.randint(12, 99)
            value = a * b
        else:
            b, q = rng.randint(3, 40), rng.randint(20, 2_500)
            a, value = b * q, q
        question = f"Calculate {a:,} {op} {b:,}."
        if question in seen:
            continue
        seen.add(question)
        rows.append({"id": f"ar{len(rows) + 1:04d}", "question": question,
                     "reference": f"{value:,}", "topic": {"+": "addition", "-": "subtraction",
                                                          "×": "multiplication",
                                                          "÷": "division"}[op]})
    return rows


# --- document QA: long shared prefixes (the prompt cache) -----------------------------------------
# 200 generated town reports of 1,500+ tokens (about 4 characters a token), 10 questions each,
# rows shuffled: the questions about one document are spread across the file, as in a real
# question set. Each report states its facts in varied prose; the references are those facts.

SYLLABLES = ["bar", "cel", "dor", "fen", "gal", "hol", "kir", "lom", "mar", "nor", "pel", "quin",
             "ros", "sal", "tor", "ul", "ven", "wil", "yar", "zan", "bro", "cra", "dun", "ers"]
REGIONS = ["the northern uplands", "the eastern marshes", "the western coast", "the southern plain",
           "the central valley", "the lake district", "the pine hills", "the river delta"]
INDUSTRIES = ["wool weaving", "glass blowing", "salt panning", "clock making", "paper milling",
              "boat building", "cheese making", "copper mining", "rope making", "bell founding",
              "lace making", "apple pressing"]
BUILDINGS = ["a round library", "a copper-roofed market hall", "a stone lighthouse",
             "a twelve-arched bridge", "a timber guildhall", "an observatory", "a covered arcade",
             "a salt warehouse turned museum", "a bell tower", "a glass conservatory"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
FIRST_NAMES = ["Ada", "Bruno", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ines",
               "Jonas", "Kaja", "Luca", "Mira", "Nils", "Olga", "Pavel", "Rosa", "Stefan", "Tilda",
               "Viktor"]
TOPICS = {
    "history": [
        "Old charters kept in the archive describe {a} {b} that shaped the early settlement.",
        "Chroniclers of the period wrote at length about the {a} disputes over {b} rights.",
        "Several families arrived in waves, each bringing {a} customs and a taste for {b}.",
        "A fire in the old quarter destroyed much of the {a} housing, and the rebuilding favoured {b}.",
        "Records from the guilds show how {a} trade routes slowly replaced the {b} ones.",
        "The town walls were pulled down long ago, and their {a} stones now line the {b} lanes.",
    ],
    "economy": [
        "Most workshops today are small, {a} firms that sell {b} goods to the wider region.",
        "Local banks lend mainly to {a} cooperatives, which in turn employ {b} apprentices.",
        "Seasonal work still matters: in good years the {a} harvest brings {b} visitors.",
        "The council publishes a {a} report each spring on wages, rents and the {b} market.",
        "Shopkeepers complain that {a} rents push {b} businesses to the edge of town.",
        "Exports leave by road and rail, and a {a} share still travels on {b} barges.",
    ],
    "geography": [
        "The land around the town is {a}, cut by {b} streams that flood after the thaw.",
        "Walkers follow a {a} path along the ridge, with {b} views over the farmland.",
        "Winters are {a} and summers {b}, with most rain falling in the autumn months.",
        "Hedgerows divide the {a} fields, and {b} woods cover the steeper slopes.",
        "From the highest point one can see {a} villages and, on clear days, the {b} sea.",
        "The soil is {a} near the water and {b} on the higher ground to the north.",
    ],
    "culture": [
        "The town choir sings {a} songs at weddings and {b} hymns at funerals.",
        "A small theatre stages {a} comedies in winter and {b} dramas in summer.",
        "Children learn the {a} dances of the region at school, along with {b} crafts.",
        "Cafés around the square serve {a} pastries and a {b} local coffee.",
        "The museum keeps {a} tools, {b} costumes and a collection of old maps.",
        "Writers who settled here praised the {a} light and the {b} pace of life.",
    ],
}
ADJECTIVES = ["quiet", "busy", "gentle", "steep", "narrow", "broad", "ancient", "modest", "lively",
              "hardy", "sheltered", "windy", "fertile", "rocky", "mild", "harsh", "bright", "humble",
              "careful", "generous", "stubborn", "patient", "crowded", "scattered", "seasonal",
              "rival", "shared", "forgotten", "famous", "plain", "costly", "cheap", "sturdy"]


def _town_name(rng: random.Random) -> str:
    return "".join(rng.sample(SYLLABLES, rng.choice([2, 3]))).capitalize()


def _paragraph(rng: random.Random, topic: str, sentences: int) -> str:
    return " ".join(
        rng.choice(TOPICS[topic]).format(a=rng.choice(ADJECTIVES), b=rng.choice(ADJECTIVES))
        for _ in range(sentences)
    )


def _town(rng: random.Random) -> tuple[str, list[tuple[str, str]]]:
    """One town report (1,500+ estimated tokens) and its (question, reference) pairs."""
    name = _town_name(rng)
    river = _town_name(rng)
    twin = _town_name(rng)
    facts = {
        "region": rng.choice(REGIONS),
        "founded": str(rng.randint(1100, 1850)),
        "population": f"{rng.randint(2, 95) * 1000 + rng.randint(1, 999):,}",
        "river": river,
        "industry": rng.choice(INDUSTRIES),
        "mayor": f"{rng.choice(FIRST_NAMES)} {_town_name(rng)}",
        "festival": rng.choice(MONTHS),
        "building": rng.choice(BUILDINGS),
        "twin": twin,
        "elevation": str(rng.randint(5, 1400)),
        "bridges": str(rng.randint(2, 19)),
        "schools": str(rng.randint(1, 12)),
        "market": rng.choice(["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]),
        "railway": str(rng.randint(1840, 1935)),
    }
    f = facts
    intro = (
        f"{name} is a town in {f['region']}, on the banks of the river {river}, "
        f"{f['elevation']} metres above sea level. It was founded in {f['founded']} and is home "
        f"to {f['population']} people today."
    )
    statements = {
        "history": f"The railway reached {name} in {f['railway']}, and the town grew quickly "
                   "after.",
        "economy": f"Its best-known trade is {f['industry']}, and the weekly market is held every "
                   f"{f['market']}.",
        "geography": f"The river {river} is crossed by {f['bridges']} bridges inside the town.",
        "culture": f"The town festival takes place every {f['festival']}; the best-known sight is "
                   f"{f['building']}. {name} is twinned with {twin}, and its {f['schools']} "
                   f"schools take part in exchanges. The current mayor is {f['mayor']}.",
    }
    paragraphs = [intro]
    topics = list(TOPICS)
    rng.shuffle(topics)
    for topic in topics:
        before = _paragraph(rng, topic, rng.randint(5, 8))
        after = _paragraph(rng, topic, rng.randint(5, 8))
        paragraphs.append(f"{topic.capitalize()}. {before} {statements[topic]} {after}")
        paragraphs.append(_paragraph(rng, topic, rng.randint(6, 9)))
    document = f"A report on {name}\n\n" + "\n\n".join(paragraphs)
    while len(document) < 6_400:  # 1,600 tokens at 4 characters a token
        document += "\n\n" + _paragraph(rng, rng.choice(topics), 7)
    questions = [
        (f"In which year was {name} founded?", f["founded"]),
        (f"How many people live in {name}?", f["population"]),
        (f"On which river does {name} lie?", river),
        (f"What is {name}'s best-known trade?", f["industry"]),
        (f"Who is the mayor of {name}?", f["mayor"]),
        (f"In which month is the festival of {name} held?", f["festival"]),
        (f"What is the best-known sight of {name}?", f["building"]),
        (f"Which town is {name} twinned with?", twin),
        (f"How high above sea level is {name}, in metres?", f["elevation"]),
        (f"How many bridges cross the river inside {name}?", f["bridges"]),
        (f"How many schools does {name} have?", f["schools"]),
        (f"On which day is the weekly market of {name}?", f["market"]),
        (f"When did the railway reach {name}?", f["railway"]),
        (f"In which region is {name}?", f["region"]),
    ]
    return document, rng.sample(questions, 10)


def doc_qa() -> list[dict[str, str]]:
    rng = random.Random(20261208)
    rows = []
    for d in range(200):
        document, questions = _town(rng)
        rows += [
            {"id": f"doc{d:03d}-q{q:02d}", "document": document, "question": question,
             "reference": reference}
            for q, (question, reference) in enumerate(questions)
        ]
    rng.shuffle(rows)
    return rows


# --- writing ------------------------------------------------------------------------------------


def write_jsonl(name: str, rows: list[dict[str, Any]]) -> None:
    with (HERE / name).open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_parquet(name: str, rows: list[dict[str, Any]]) -> None:
    # Every column of these sets is a string: say so, so an all-null column cannot turn into
    # the null type.
    schema = pa.schema([(key, pa.string()) for key in rows[0]])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), HERE / name, compression="zstd")


def main() -> None:
    prompts = [
        {"id": f"p{i:03d}", "prompt": prompt, "category": category}
        for i, (category, prompt) in enumerate(PROMPTS, 1)
    ]
    sets = {
        "prompts": prompts,
        "eval_questions": eval_questions(),
        "generation": generation(),
        "eval_multiple_choice": multiple_choice(),
        "eval_arithmetic": short_arithmetic(),
    }
    for name, rows in sets.items():
        write_jsonl(f"{name}.jsonl", rows)
        write_parquet(f"{name}.parquet", rows)
    with (HERE / "prompts.csv").open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(prompts[0]))
        writer.writeheader()
        writer.writerows(prompts)
    write_jsonl(
        "conversations.jsonl",
        [{"id": f"c{i:02d}", "messages": m} for i, m in enumerate(CONVERSATIONS, 1)],
    )
    write_jsonl("batch_api.jsonl", batch_api())
    qa = doc_qa()
    write_parquet("doc_qa.parquet", qa)  # Parquet only: its dictionary stores each document once
    for name in ("prompts.jsonl", "eval_multiple_choice.jsonl"):
        shutil.copyfile(HERE / name, PACKAGE_SAMPLES / name)
    for name, rows in sets.items():
        print(f"{name}: {len(rows)} rows")
    print(f"doc_qa: {len(qa)} rows, {(HERE / 'doc_qa.parquet').stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
