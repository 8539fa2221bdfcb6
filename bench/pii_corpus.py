"""A labelled, synthetic PII corpus: short Reddit-like comments and reviews with known values.

Each sentence comes from a template (informal, first person, sometimes all lower case) whose
slots are filled with Faker values (locale en_US; IBANs also from a few European locales) or
with values from short lists of real places, and returns the exact character offsets of every
inserted value::

    {"text": "my number is (312) 748-0182, text don't call",
     "spans": [{"entity": "phone", "start": 13, "end": 27, "kind": "phone (AAA) EEE-SSSS"}],
     "decoys": [], "template": "phone-02", "style": "cased",
     "parts": [{"template": "phone-02", "start": 0, "end": 44}]}

``entity`` is one of hubtune's PII entity names (hubtune.pii.ENTITIES): person, email, phone,
credit_card, iban, ip_address, url, location, date_of_birth, handle. ``kind`` says which form
the value took (a card network and grouping, a phone or date format, a first name alone, ...);
``parts`` says which template wrote which characters (a comment can be two templates).

About a quarter of the sentences hold no PII at all; some of those (and some appended to PII
sentences) are **hard negatives**: values that look like PII but are not in the entity list,
recorded under ``decoys`` (``{"kind", "start", "end"}``) so that a detection on them can be
told apart from one on ordinary text: a date without a birth word before it, version numbers
(three parts, and four parts, which are syntactically valid IPv4 addresses), file names whose
extension is a country-code TLD (``setup.py``), a missing space after a full stop
(``fine.no``), order numbers, prices, times, subreddits (``r/name``, not a user handle),
brands, pet names, a relative date or a decade right after "born" ("born and raised here, moved
out 5 years ago"), and a subreddit's "birthday" (its creation date after the word "birthday").

Values follow the platforms' rules where a detector could not be blamed for missing a value
that cannot exist: user names are Reddit-valid (3-20 letters, digits, ``_``, ``-``) or
Twitter-valid (at most 15 letters, digits, ``_``), phone numbers use real US area codes and
exchanges (no N11, no 555), dates of birth have a birth word ("born", "birth", "DOB",
"birthday") at most 40 characters before them, as hubtune.pii defines them.

Deterministic: ``generate(n, seed)`` gives the same corpus for the same arguments (one
``random.Random(seed)`` for the structure, Faker instances seeded with ``seed_instance``).

    python bench/pii_corpus.py --sentences 3000 --seed 42 --out /tmp/pii.jsonl
    python bench/pii_corpus.py --sentences 20            # print a sample
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections import Counter
from collections.abc import Callable
from datetime import date
from typing import Any

from faker import Faker

__all__ = ["DECOY_KINDS", "ENTITIES", "TEMPLATES", "generate"]

ENTITIES = (
    "person",
    "email",
    "phone",
    "credit_card",
    "iban",
    "ip_address",
    "url",
    "location",
    "date_of_birth",
    "handle",
)
NEGATIVE_SHARE = 0.25  # sentences with no PII at all
HARD_SHARE = 0.4  # of those, the share built from a hard-negative template
APPEND_SHARE = 0.25  # sentences that get a second template appended
LOWER_SHARE = 0.2  # sentences typed in lower case
MAX_SPANS = 3

# --------------------------------------------------------------------------- templates
# (id, text): {slot} is filled by SLOTS below. The ids group templates by what they hold.

TEMPLATES: list[tuple[str, str]] = [
    # person: full names, first names alone, a title with a last name
    ("person-01", "my neighbor {name} keeps parking in front of my driveway and i'm losing it"),
    ("person-02", "Update: {first} finally texted me back after three weeks lol"),
    ("person-03", "Shoutout to {name} at the front desk, she sorted out my booking in 5 minutes."),
    ("person-04", "I asked {first} and {first} to help me move and neither showed up. Never again"),
    ("person-05", "ordered from them twice, the owner {name} even wrote a handwritten note. 10/10"),
    (
        "person-06",
        "My ex, {name}, still has my Switch. How do I get it back without talking to her",
    ),
    ("person-07", "AITA for not inviting {first} to my wedding after what she said at the shower?"),
    ("person-08", "{name} was our realtor and honestly I would not recommend him to anyone."),
    ("person-09", "Dr. {last} told me it was just stress. It was not just stress."),
    ("person-10", "my boss {first} scheduled a meeting at 4:55 on a friday. who does that"),
    ("person-11", "Had {name} as a professor and he was the reason I stayed in the major."),
    ("person-12", "we named the baby after my grandpa, {first}, and my MIL is furious"),
    # email
    ("email-01", "If anyone has a spare ticket, email me at {email} and I'll Venmo you right away"),
    ("email-02", "you can reach me at {email}, i check it like once a day tho"),
    ("email-03", "Sent my resume to {email} two weeks ago and still nothing. Should I follow up?"),
    ("email-04", "Their support address ({email}) just bounces. Great customer service guys."),
    ("email-05", "pm me or shoot a message to {email} if you want the knitting pattern"),
    # phone, with and without context words
    ("phone-01", "Call me at {phone} if you find my dog, he's a small brown terrier named {pet}."),
    ("phone-02", "my number is {phone}, text don't call"),
    ("phone-03", "The contractor's number was {phone}. Avoid, he took the deposit and vanished."),
    ("phone-04", "Does anyone know why I keep getting calls from {phone}? 6 times today."),
    ("phone-05", "{phone} is the landlord's cell if anyone in building C needs it"),
    ("phone-06", "Free couch, pick up tonight. {phone}"),
    ("phone-07", "lost my wallet near the station, if you have it pls text {phone}"),
    ("phone-08", "I dialed {phone} and some guy picked up and asked for my SSN. Scam right?"),
    # credit card
    ("card-01", "Someone charged $400 to my card {card} and the bank says they can't do anything"),
    ("card-02", "lol my mom just posted her credit card number {card} in the family group chat"),
    ("card-03", "Is it safe to keep {card} saved in the browser autofill? asking for a friend"),
    ("card-04", "Card {card} keeps getting declined at checkout even though I have money on it."),
    ("card-05", "i accidentally read out {card} on stream, how fast can i cancel it"),
    # IBAN
    ("iban-01", "Rent goes to IBAN {iban}, transfer before the 1st please."),
    ("iban-02", "my landlord gave me {iban} for the deposit but the bank says the name is wrong"),
    ("iban-03", "Paid the invoice to {iban} and the money came back after 5 days. Anyone else?"),
    ("iban-04", "can someone check if {iban} is legit? seller on marketplace wants a transfer"),
    ("iban-05", "Refunds are sent to the account {iban}, it says so in the confirmation mail."),
    # IP address
    ("ip-01", "My router keeps assigning {ip} to two devices at once, how do I fix this?"),
    ("ip-02", "I got banned from the server and my IP is {ip}, can a mod look into it?"),
    ("ip-03", "someone keeps trying to ssh into my box from {ip}, blocked it already"),
    ("ip-04", "Port forwarding works on {ip} but not from outside. What am I missing?"),
    ("ip-05", "pinging {ip} gives 300ms, is that normal for a home connection?"),
    # URL
    ("url-01", "Found the original recipe here: {url} (the comments are gold)"),
    ("url-02", "my portfolio is at {url}, feedback welcome!!"),
    ("url-03", "They moved the docs to {url} and broke every link on Stack Overflow."),
    ("url-04", "Bought it from {url} and it arrived broken. Don't."),
    ("url-05", "here's the album {url}"),
    # location: real cities, US states, countries
    ("location-01", "I just moved to {city} from {city} and I have zero friends, any tips?"),
    ("location-02", "Visiting {country} next month for the first time, what should I not miss?"),
    ("location-03", "The best pizza I ever had was in a tiny place outside {city}."),
    ("location-04", "we drove from {city} to {city} in one day, never doing that again"),
    ("location-05", "is {country} safe for solo female travelers right now?"),
    ("location-06", "Anyone else in {state} get the weird alert on their phone last night?"),
    ("location-07", "Just got back from {country} and the jet lag is killing me"),
    ("location-08", "born and raised in {city} and I still can't drive in the snow"),
    # date of birth: a birth word at most 40 characters before the date
    ("dob-01", "I was born on {dob} so technically I'm a millennial right?"),
    ("dob-02", "DOB: {dob}, and yes the form still asked for my maiden name"),
    ("dob-03", "my birthday is {dob} and nobody at work remembered lol"),
    ("dob-04", "The form says date of birth {dob} but the clerk typed it wrong."),
    ("dob-05", "Born {dob} in {city}, moved to the states when I was six."),
    ("dob-06", "They asked for my DOB ({dob}) on a cold call, is that a scam?"),
    ("dob-07", "fun fact: i was born {dob}, same day as my dad"),
    # handles: u/name and @name
    ("handle-01", "Thanks {uhandle} for the recommendation, the book was amazing"),
    ("handle-02", "follow me on twitter {athandle} for more cursed recipes"),
    ("handle-03", "{uhandle} is a scammer, do NOT trade with them. Proof in comments."),
    ("handle-04", "lmao {athandle} literally called this a year ago"),
    ("handle-05", "paging {uhandle}, you were right about the landlord"),
    ("handle-06", "shoutout to {athandle} and {athandle} for carrying the raid last night"),
    # several values
    ("multi-01", "Hi I'm {first}, I live in {city}, you can reach me at {phone}."),
    ("multi-02", "Selling my old bike, contact {name} at {email} or {phone}."),
    ("multi-03", "{name} ({email}) is organizing the meetup in {city} this Saturday."),
    ("multi-04", "Name: {name}, DOB: {dob}, card: {card}. yes my grandma posted this on facebook"),
    ("multi-05", "My cousin {first} lives in {country} and sends money from {iban} every month"),
    ("multi-06", "If the site at {url} is down try the mirror, or ping {athandle} on twitter"),
    ("multi-07", "Logged in from {ip} while I was in {city}? That wasn't me."),
    ("multi-08", "{uhandle} here, born on {dob}, and I approve this message"),
    ("multi-09", "My cousin {name} from {state} just sent me {url} and now I can't unsee it"),
    ("multi-10", "email {email} or call {phone}, ask for {first}"),
    ("multi-11", "born and raised in {city}, moved to {city} {ago} and never looked back"),
    # no PII
    ("negative-01", "honestly this is the best thing I've read all week"),
    ("negative-02", "Does anyone else think the new update made the battery life worse?"),
    ("negative-03", "I tried the recipe with oat milk and it turned out fine, just a bit runny."),
    ("negative-04", "lol same, my cat does exactly this at 3am every night"),
    ("negative-05", "Returned it after two days. The zipper broke and the seams were coming apart"),
    ("negative-06", "Can we talk about how expensive groceries have gotten? It's insane."),
    ("negative-07", "i've been lurking here for years and this is my first post, be nice"),
    (
        "negative-08",
        "Five stars. Comfortable, fits true to size, and the color is like the photos.",
    ),
    ("negative-09", "not gonna lie I cried at the ending"),
    ("negative-10", "This sub has helped me so much with my anxiety, thank you all."),
    ("negative-11", "Anyone have tips for keeping basil alive indoors? Mine always dies."),
    ("negative-12", "the customer service was friendly but the product itself is mediocre at best"),
    ("negative-13", "My landlord finally fixed the heating after three months of emails."),
    ("negative-14", "why does every tutorial skip the one step I actually need help with"),
    ("negative-15", "Edit: thanks for the gold, kind stranger!"),
    ("negative-16", "We switched to the cheaper brand and honestly can't tell the difference."),
    ("negative-17", "3 stars. Does the job, but the app asks for way too many permissions."),
    ("negative-18", "ngl the sequel is better than the original and I will die on this hill"),
    # hard negatives: look like PII, are not
    ("hard-01", "the movie came out on {date} and I still haven't seen it"),
    ("hard-02", "Our lease started {date}, and the heater broke the same week."),
    ("hard-03", "Updated to version {version} and now nothing works, great job devs"),
    ("hard-04", "firmware {version4} fixed the wifi drops for me"),
    ("hard-05", "just run {file} and it should build, if not check {file}"),
    ("hard-06", "Paid {price} for this and it broke in a week."),
    ("hard-07", "My order {order} still says processing after 10 days"),
    ("hard-08", "meeting got moved to {time} again, third time this week"),
    ("hard-09", "I was born in {decade} and I still remember dial-up"),
    ("hard-10", "born and raised here, moved out {ago} and never looked back"),
    ("hard-11", "happy birthday to this sub! it was created on {subdate}"),
    ("hard-12", "Check out {sub}, they helped me a ton when I was starting out"),
    ("hard-13", "returned it and got a refund, {glued}"),
    ("hard-14", "{brand} support told me to reset it, {brand} said the same thing"),
    ("hard-15", "my dog {pet} ate my airpods, vet says he'll be fine"),
    ("hard-16", "the {year} model is way better than the new one imo"),
    ("hard-17", "Took the {time} train on {date}, it was 40 minutes late as usual"),
    ("hard-18", "whoever wrote {file} deserves a raise, it actually explains things"),
]

# --------------------------------------------------------------------------- values

CITIES = [
    "Chicago", "Seattle", "Austin", "Denver", "Boston", "Portland", "Phoenix", "Atlanta",
    "Nashville", "Minneapolis", "San Diego", "Philadelphia", "Detroit", "Miami", "Dallas",
    "Houston", "Pittsburgh", "Baltimore", "Sacramento", "Salt Lake City", "New Orleans",
    "Kansas City", "St. Louis", "Cleveland", "Toronto", "Vancouver", "London", "Manchester",
    "Dublin", "Berlin", "Munich", "Paris", "Lyon", "Amsterdam", "Madrid", "Barcelona", "Lisbon",
    "Rome", "Milan", "Vienna", "Prague", "Warsaw", "Stockholm", "Oslo", "Copenhagen",
    "Sydney", "Melbourne", "Auckland", "Tokyo", "Osaka", "Seoul", "Singapore", "Bangkok",
    "Mumbai", "Delhi", "Mexico City", "Buenos Aires", "Sao Paulo", "Cape Town", "Nairobi",
]  # fmt: skip
AREA_CODES = [
    201, 202, 206, 212, 213, 214, 215, 216, 224, 239, 248, 253, 267, 281, 303, 305, 310, 312,
    313, 314, 323, 347, 360, 385, 404, 407, 408, 412, 415, 425, 469, 480, 503, 504, 510, 512,
    513, 602, 612, 614, 615, 617, 619, 626, 646, 650, 702, 704, 713, 718, 720, 732, 773, 786,
    801, 813, 832, 858, 904, 917, 919, 949, 954, 972,
]  # fmt: skip
PHONE_FORMATS = {  # kind -> format, A: area code, E: exchange, S: subscriber
    "(AAA) EEE-SSSS": "({a}) {e}-{s}",
    "AAA-EEE-SSSS": "{a}-{e}-{s}",
    "AAA.EEE.SSSS": "{a}.{e}.{s}",
    "AAA EEE SSSS": "{a} {e} {s}",
    "+1 AAA-EEE-SSSS": "+1 {a}-{e}-{s}",
    "+1 (AAA) EEE-SSSS": "+1 ({a}) {e}-{s}",
    "1-AAA-EEE-SSSS": "1-{a}-{e}-{s}",
    "AAAEEESSSS": "{a}{e}{s}",
}
CARD_TYPES = {  # Faker card type -> weight (roughly how common the network is)
    "visa16": 30,
    "mastercard": 25,
    "amex": 12,
    "discover": 10,
    "jcb16": 5,
    "diners": 5,
    "visa13": 3,
    "visa19": 5,
    "maestro": 5,
}
# as printed; other networks in groups of 4
CARD_GROUPS = {"amex": (4, 6, 5), "diners": (4, 6, 4), "visa13": (4, 3, 3, 3)}
IBAN_LOCALES = ["en_US", "en_US", "de_DE", "fr_FR", "nl_NL", "es_ES", "it_IT"]
MONTHS = [
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
]  # fmt: skip
DATE_FORMATS = [  # kind
    "D Month YYYY",
    "Month D, YYYY",
    "Month Dth, YYYY",
    "Dth of Month YYYY",
    "Mon D YYYY",
    "MM/DD/YYYY",
    "M/D/YY",
    "YYYY-MM-DD",
]
SUBREDDITS = ["personalfinance", "AskReddit", "learnpython", "homeowners", "Cooking", "running"]
FILES = [
    "setup.py", "main.py", "install.sh", "build.sh", "README.md", "CHANGELOG.md", "main.rs",
    "script.pl", "config.yaml", "notes.txt", "index.js", "Makefile.am", "app.json",
]  # fmt: skip
GLUED = [  # a full stop with no space after it
    "no complaints.",
    "fine.no complaints here",
    "tried it twice.no luck",
    "would buy again.it's great",
    "read the manual.so confusing though",
    "whatever.at least it works",
    "took a while.in the end it was fine",
    "all good.me and my wife are happy",
]
BRANDS = ["Apple", "Amazon", "Samsung", "Target", "Costco", "Dell", "Comcast", "Verizon"]
PETS = ["Biscuit", "Luna", "Max", "Bella", "Pickles", "Waffles", "Cooper", "Daisy", "Mochi"]
AGO = ["5 years ago", "a few months ago", "ten years ago", "last year", "2 years ago"]
DECADES = ["the 90s", "the late 80s", "the early 2000s", "the 70s", "the mid 90s"]
TIMES = ["4:30pm", "10:15", "9am", "noon", "7:45 pm", "8:00"]
PREFIXES = ["lol ", "ok so ", "honestly ", "Edit: ", "tbh ", "PSA: ", "Update: ", "hey all, "]
SUFFIXES = [" lol", " :)", " /s", " Thanks in advance!", " smh", " 🙃", " Any advice?"]
_REDDIT_NAME = re.compile(r"^[A-Za-z0-9_-]{3,20}$")
_TWITTER_NAME = re.compile(r"^[A-Za-z0-9_]{2,15}$")


class _Values:
    """Draws slot values; every draw returns ``(value, kind)``."""

    def __init__(self, seed: int, rng: random.Random) -> None:
        self.rng = rng
        self.fake = Faker("en_US")
        self.fake.seed_instance(seed)
        self.iban_fakers = {}
        for i, locale in enumerate(dict.fromkeys(IBAN_LOCALES)):
            fake = Faker(locale)
            fake.seed_instance(seed + 1000 + i)
            self.iban_fakers[locale] = fake

    # --- PII
    def name(self) -> tuple[str, str]:
        if self.rng.random() < 0.15:
            value = self.fake.name()  # sometimes with a prefix or suffix (Dr., DDS, ...)
            parts = value.split()
            return value, "full name with title" if len(parts) > 2 else "full name"
        return f"{self.fake.first_name()} {self.fake.last_name()}", "full name"

    def first(self) -> tuple[str, str]:
        return self.fake.first_name(), "first name"

    def last(self) -> tuple[str, str]:
        return self.fake.last_name(), "last name after a title"

    def email(self) -> tuple[str, str]:
        draw = self.rng.random()
        if draw < 0.5:
            return self.fake.free_email(), "free-mail address"
        if draw < 0.8:
            return self.fake.email(), "example.* address"
        return self.fake.company_email(), "company address"

    def phone(self) -> tuple[str, str]:
        area = self.rng.choice(AREA_CODES)
        while True:
            exchange = self.rng.randint(200, 999)
            if exchange % 100 != 11 and exchange != 555:
                break
        subscriber = self.rng.randint(0, 9999)
        kind = self.rng.choice(list(PHONE_FORMATS))
        value = PHONE_FORMATS[kind].format(a=area, e=exchange, s=f"{subscriber:04d}")
        return value, f"phone {kind}"

    def card(self) -> tuple[str, str]:
        card_type = self.rng.choices(list(CARD_TYPES), weights=list(CARD_TYPES.values()))[0]
        number = self.fake.credit_card_number(card_type=card_type)
        network = card_type
        if card_type == "mastercard":  # Faker draws both Mastercard ranges
            network = "mastercard 2221-2720" if number[0] == "2" else "mastercard 51-55"
        draw = self.rng.random()
        if draw < 0.5:
            return number, f"{network}, no spaces"
        groups = CARD_GROUPS.get(card_type) or tuple(
            [4] * (len(number) // 4) + ([len(number) % 4] if len(number) % 4 else [])
        )
        parts, at = [], 0
        for size in groups:
            parts.append(number[at : at + size])
            at += size
        if at < len(number):
            parts.append(number[at:])
        sep = " " if draw < 0.9 else "-"
        return sep.join(parts), f"{network}, {'spaces' if sep == ' ' else 'dashes'}"

    def iban(self) -> tuple[str, str]:
        locale = self.rng.choice(IBAN_LOCALES)
        value = self.iban_fakers[locale].iban()
        if self.rng.random() < 0.4:
            return " ".join(value[i : i + 4] for i in range(0, len(value), 4)), (
                f"{value[:2]} IBAN, groups of 4"
            )
        return value, f"{value[:2]} IBAN, compact"

    def ip(self) -> tuple[str, str]:
        if self.rng.random() < 0.25:
            return self.fake.ipv4_private(), "private IPv4"
        return self.fake.ipv4_public(), "public IPv4"

    def url(self) -> tuple[str, str]:
        draw = self.rng.random()
        if draw < 0.45:
            return self.fake.uri(), "URL with path"
        if draw < 0.8:
            return self.fake.url(), "URL, site root"
        value = self.fake.uri().split("://", 1)[1]
        if not value.startswith("www."):
            value = "www." + value
        return value, "www. URL without scheme"

    def city(self) -> tuple[str, str]:
        return self.rng.choice(CITIES), "city"

    def country(self) -> tuple[str, str]:
        while True:
            value = self.fake.country()
            if not re.search(r"[(),&]", value) and len(value.split()) <= 3:
                return value, "country"

    def state(self) -> tuple[str, str]:
        return self.fake.state(), "US state"

    def dob(self) -> tuple[str, str]:
        day = self.fake.date_of_birth(minimum_age=16, maximum_age=75)
        kind = self.rng.choice(DATE_FORMATS)
        return _format_date(day, kind), f"date {kind}"

    def uhandle(self) -> tuple[str, str]:
        name = self._user_name(_REDDIT_NAME, 20)
        if self.rng.random() < 0.2:
            return f"/u/{name}", "/u/name"
        return f"u/{name}", "u/name"

    def athandle(self) -> tuple[str, str]:
        return f"@{self._user_name(_TWITTER_NAME, 15)}", "@name"

    def _user_name(self, valid: re.Pattern[str], longest: int) -> str:
        while True:
            name = self.fake.user_name().replace(".", self.rng.choice(["", "_"]))
            draw = self.rng.random()
            if draw < 0.15:
                name = name.capitalize()
            elif draw < 0.25:
                name = f"{name}_{self.rng.randint(1, 99)}"
            elif draw < 0.3:
                name = f"the_real_{name}"
            if valid.match(name) and len(name) <= longest:
                return name

    # --- decoys (not PII)
    def date(self) -> tuple[str, str]:
        day = self.fake.date_between(start_date="-30y", end_date="today")
        return _format_date(day, self.rng.choice(DATE_FORMATS)), "date, no birth word"

    def subdate(self) -> tuple[str, str]:
        day = self.fake.date_between(start_date=date(2008, 1, 1), end_date=date(2020, 12, 31))
        return _format_date(day, self.rng.choice(DATE_FORMATS)), "a subreddit's birthday (date)"

    def version(self) -> tuple[str, str]:
        r = self.rng
        value = f"{r.randint(1, 19)}.{r.randint(0, 30)}.{r.randint(0, 12)}"
        return (f"v{value}" if r.random() < 0.3 else value), "version a.b.c"

    def version4(self) -> tuple[str, str]:
        r = self.rng
        return (
            f"{r.randint(1, 12)}.{r.randint(0, 9)}.{r.randint(0, 30)}.{r.randint(1, 250)}",
            "version a.b.c.d (a valid IPv4 shape)",
        )

    def file(self) -> tuple[str, str]:
        return self.rng.choice(FILES), "file name"

    def price(self) -> tuple[str, str]:
        r = self.rng
        return (
            r.choice([f"${r.randint(5, 99)}", f"${r.randint(1, 2)},{r.randint(100, 999)}.99"]),
            "price",
        )

    def order(self) -> tuple[str, str]:
        return f"#{self.rng.randint(10**6, 10**9 - 1)}", "order number (7-9 digits)"

    def time(self) -> tuple[str, str]:
        return self.rng.choice(TIMES), "time of day"

    def ago(self) -> tuple[str, str]:
        return self.rng.choice(AGO), "relative date after 'born'"

    def decade(self) -> tuple[str, str]:
        return self.rng.choice(DECADES), "decade after 'born'"

    def sub(self) -> tuple[str, str]:
        return f"r/{self.rng.choice(SUBREDDITS)}", "subreddit r/name"

    def glued(self) -> tuple[str, str]:
        return self.rng.choice(GLUED), "missing space after a full stop"

    def brand(self) -> tuple[str, str]:
        return self.rng.choice(BRANDS), "brand"

    def pet(self) -> tuple[str, str]:
        return self.rng.choice(PETS), "pet name"

    def year(self) -> tuple[str, str]:
        return str(self.rng.randint(2005, 2023)), "year"


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _format_date(day: date, kind: str) -> str:
    month = MONTHS[day.month - 1]
    return {
        "D Month YYYY": f"{day.day} {month} {day.year}",
        "Month D, YYYY": f"{month} {day.day}, {day.year}",
        "Month Dth, YYYY": f"{month} {_ordinal(day.day)}, {day.year}",
        "Dth of Month YYYY": f"{_ordinal(day.day)} of {month} {day.year}",
        "Mon D YYYY": f"{month[:3]} {day.day} {day.year}",
        "MM/DD/YYYY": f"{day.month:02d}/{day.day:02d}/{day.year}",
        "M/D/YY": f"{day.month}/{day.day}/{day.year % 100:02d}",
        "YYYY-MM-DD": day.isoformat(),
    }[kind]


DECOY_SLOTS = (
    "date", "subdate", "version", "version4", "file", "price", "order", "time", "ago", "decade",
    "sub", "glued", "brand", "pet", "year",
)  # fmt: skip
# slot -> (hubtune entity, or None for a decoy)
SLOTS: dict[str, str | None] = {
    "name": "person",
    "first": "person",
    "last": "person",
    "email": "email",
    "phone": "phone",
    "card": "credit_card",
    "iban": "iban",
    "ip": "ip_address",
    "url": "url",
    "city": "location",
    "country": "location",
    "state": "location",
    "dob": "date_of_birth",
    "uhandle": "handle",
    "athandle": "handle",
    **dict.fromkeys(DECOY_SLOTS),
}
DECOY_KINDS = sorted(k for k, v in SLOTS.items() if v is None)
_SLOT = re.compile(r"\{(\w+)\}")


def _parse(text: str) -> list[tuple[str, str | None]]:
    """A template as pieces: ``(literal, None)`` and ``(slot, slot)``."""
    pieces: list[tuple[str, str | None]] = []
    at = 0
    for match in _SLOT.finditer(text):
        if match.start() > at:
            pieces.append((text[at : match.start()], None))
        slot = match.group(1)
        if slot not in SLOTS:
            raise ValueError(f"unknown slot {{{slot}}} in template {text!r}")
        pieces.append((slot, slot))
        at = match.end()
    if at < len(text):
        pieces.append((text[at:], None))
    return pieces


_PARSED = {tid: _parse(text) for tid, text in TEMPLATES}
_PII_COUNT = {tid: sum(1 for _, s in p if s and SLOTS[s]) for tid, p in _PARSED.items()}
_ENTITIES_IN = {tid: {SLOTS[s] for _, s in p if s and SLOTS[s]} for tid, p in _PARSED.items()}
_NEGATIVE = [t for t, p in _PARSED.items() if not any(s for _, s in p)]
_HARD = [t for t, p in _PARSED.items() if _PII_COUNT[t] == 0 and any(s for _, s in p)]
_BY_ENTITY = {e: [t for t in _PARSED if e in _ENTITIES_IN[t]] for e in ENTITIES}
assert all(_BY_ENTITY.values()), "every entity needs a template"
assert max(_PII_COUNT.values()) <= MAX_SPANS


class _Builder:
    """Concatenates pieces, keeping the offsets of every value."""

    def __init__(self) -> None:
        self.text = ""
        self.spans: list[dict[str, Any]] = []
        self.decoys: list[dict[str, Any]] = []
        self.parts: list[dict[str, Any]] = []  # which template wrote which characters

    def literal(self, text: str) -> None:
        self.text += text

    def value(self, value: str, entity: str | None, kind: str) -> None:
        start = len(self.text)
        self.text += value
        record = {"start": start, "end": len(self.text), "kind": kind}
        if entity is None:
            self.decoys.append(record)
        else:
            self.spans.append({"entity": entity, **record})


def _fill(tid: str, builder: _Builder, values: _Values, *, lower: bool) -> None:
    rng = values.rng
    lower_names = lower and rng.random() < 0.5  # all-lower-case typists often lower names too
    for piece, slot in _PARSED[tid]:
        if slot is None:
            builder.literal(piece.lower() if lower else piece)
            continue
        draw: Callable[[], tuple[str, str]] = getattr(values, slot)
        value, kind = draw()
        entity = SLOTS[slot]
        if lower_names and entity in ("person", "location"):
            value, kind = value.lower(), f"{kind}, lower case"
        builder.value(value, entity, kind)


def generate(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` labelled sentences (see the module docstring), the same for the same ``seed``."""
    rng = random.Random(seed)
    values = _Values(seed, rng)
    out = []
    for _ in range(n):
        negative = rng.random() < NEGATIVE_SHARE
        if negative:
            first = rng.choice(_HARD if rng.random() < HARD_SHARE else _NEGATIVE)
        else:
            first = rng.choice(_BY_ENTITY[rng.choice(ENTITIES)])
        parts = [first]
        if rng.random() < APPEND_SHARE:
            room = MAX_SPANS - _PII_COUNT[first]
            if not negative and room > 0 and rng.random() < 0.4:
                pool = [t for t in _PARSED if 0 < _PII_COUNT[t] <= room]
            else:
                pool = _HARD if rng.random() < 0.4 else _NEGATIVE
            parts.append(rng.choice([t for t in pool if t != first]))
        lower = rng.random() < LOWER_SHARE
        builder = _Builder()
        if rng.random() < 0.12:
            prefix = rng.choice(PREFIXES)
            builder.literal(prefix.lower() if lower else prefix)
        for i, tid in enumerate(parts):
            if i:  # a run-on now and then, as typed; mostly a full stop between the two
                end = "" if builder.text[-1] in ".!?)" or rng.random() < 0.3 else "."
                builder.literal(end + " ")
            start = len(builder.text)
            _fill(tid, builder, values, lower=lower)
            builder.parts.append({"template": tid, "start": start, "end": len(builder.text)})
        if rng.random() < 0.12:
            suffix = rng.choice(SUFFIXES)
            builder.literal(suffix.lower() if lower else suffix)
        sentence = {
            "text": builder.text,
            "spans": builder.spans,
            "decoys": builder.decoys,
            "template": "+".join(parts),
            "parts": builder.parts,
            "style": "lower case" if lower else "cased",
        }
        _check(sentence)
        out.append(sentence)
    return out


def _check(sentence: dict[str, Any]) -> None:
    """Offsets in range, values non-empty, no two values overlapping."""
    marks = sorted(sentence["spans"] + sentence["decoys"], key=lambda s: s["start"])
    end = 0
    for mark in marks:
        assert 0 <= end <= mark["start"] < mark["end"] <= len(sentence["text"]), sentence
        value = sentence["text"][mark["start"] : mark["end"]]
        assert value == value.strip(), sentence
        end = mark["end"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sentences", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default=None, help="write JSON lines here (default: a sample)")
    args = parser.parse_args()
    corpus = generate(args.sentences, args.seed)
    counts = Counter(s["entity"] for row in corpus for s in row["spans"])
    negatives = sum(1 for row in corpus if not row["spans"])
    print(
        f"{len(corpus)} sentences, {negatives} without PII, {len(TEMPLATES)} templates; spans: "
        + ", ".join(f"{e} {counts[e]}" for e in ENTITIES),
        file=sys.stderr,
    )
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            for row in corpus:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        return
    for row in corpus[:20]:
        marked = row["text"]
        for span in sorted(row["spans"] + row["decoys"], key=lambda s: -s["start"]):
            label = span.get("entity") or f"decoy: {span['kind']}"
            marked = (
                marked[: span["start"]]
                + f"[{marked[span['start'] : span['end']]}]({label})"
                + marked[span["end"] :]
            )
        print(marked)


if __name__ == "__main__":
    main()
