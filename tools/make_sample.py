"""Build the bundled synthetic CNN/DailyMail sample and its Llama-3-style tokenizer.

Why this exists: the embedded default (``llama_ft/presets/default.yaml``) must fine-tune end to end on a laptop CPU with
no network, yet the real dataset (``abisee/cnn_dailymail``, about 1.3 GB) and Meta's Llama 3 tokenizer (gated)
cannot be fetched offline. This module writes a stand-in with the same shape: the Hugging Face hub layout of
CNN/DailyMail 3.0.0 (``article``, ``highlights``, ``id``) filled with made-up news stories, plus a byte-level BPE
tokenizer with Llama 3's special tokens and a 4,096-token vocabulary matching ``llama_ft/presets/models/llama-tiny.json``.

No real article is copied: the stories are composed from the small vocabularies and templates below. Each
story's highlights are its key-fact sentences, written the way CNN/DailyMail writes them (one per line, ending
in `` .``), so a tiny model can visibly learn to pick them out within a minute of CPU training.

Run ``python -m tools.make_sample`` to rebuild the shipped files; a fixed seed makes the output
identical byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "llama_ft" / "data" / "sample"
SAMPLE_DATASET_DIR = SAMPLE_DIR / "cnn_dailymail"
SAMPLE_TOKENIZER_DIR = SAMPLE_DIR / "tokenizer"
SAMPLE_CONFIG_NAME = "3.0.0"

SEED = 20240418
SPLIT_FILES: dict[str, tuple[str, ...]] = {
    "train": ("train-00000-of-00003", "train-00001-of-00003", "train-00002-of-00003"),
    "validation": ("validation-00000-of-00001",),
    "test": ("test-00000-of-00001",),
}
SPLIT_ROWS = {"train": 3000, "validation": 300, "test": 300}
LONG_ARTICLE_PROBABILITY = 0.06

VOCAB_SIZE = 4096
BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
SPECIAL_TOKENS = [
    BOS_TOKEN,
    EOS_TOKEN,
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|finetune_right_pad_id|>",
    *(f"<|reserved_special_token_{i}|>" for i in range(10)),
]
# The pre-tokenizer split pattern published with Llama 3 (tiktoken's cl100k-style regex).
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
MODEL_MAX_LENGTH = 2048


@dataclass(frozen=True)
class Topic:
    """One news section: its roles, organisations, slot words and sentence templates.

    ``ledes`` open the story and ``facts`` carry the other key facts; both end in a full stop and become the
    highlights. ``fillers`` are context sentences that pad the article.
    """

    section: str
    roles: tuple[str, ...]
    orgs: tuple[str, ...]
    slots: dict[str, tuple[str, ...]]
    ledes: tuple[str, ...]
    facts: tuple[str, ...]
    fillers: tuple[str, ...]


# --------------------------------------------------------------------------------------------------------------
# Vocabularies. Invented for this sample; people are random first/last name pairs.
# --------------------------------------------------------------------------------------------------------------

# fmt: off
FIRST_NAMES = (
    "Aaron", "Abigail", "Adrian", "Aisha", "Alan", "Alice", "Amir", "Andrea", "Angela", "Arthur", "Beatrice",
    "Ben", "Bernard", "Bridget", "Callum", "Carla", "Carlos", "Catherine", "Charlotte", "Chen", "Chloe",
    "Colin", "Daniel", "Deborah", "Declan", "Diana", "Dmitri", "Eleanor", "Elena", "Eliza", "Emeka", "Emma",
    "Ethan", "Fatima", "Felix", "Fiona", "Francis", "Gareth", "Grace", "Gregory", "Hannah", "Harold", "Hassan",
    "Helen", "Hugo", "Ian", "Imogen", "Isaac", "Ivan", "Jack", "Jasmine", "Javier", "Joanna", "Jonathan",
    "Julia", "Kamal", "Karen", "Keith", "Kenji", "Laura", "Leon", "Lucy", "Malcolm", "Maria", "Martin",
    "Megan", "Miguel", "Miriam", "Nadia", "Nathan", "Nicola", "Nigel", "Olivia", "Omar", "Owen", "Patricia",
    "Paul", "Priya", "Rachel", "Rafael", "Rebecca", "Richard", "Rosa", "Ruth", "Samuel", "Sandra", "Sean",
    "Simon", "Sofia", "Stephen", "Tariq", "Teresa", "Thomas", "Tobias", "Ursula", "Victor", "Wendy", "Yusuf",
    "Zara",
)
LAST_NAMES = (
    "Abbott", "Adeyemi", "Alvarez", "Ashworth", "Baker", "Banerjee", "Barlow", "Bennett", "Blackwood",
    "Brennan", "Caldwell", "Carter", "Castillo", "Chambers", "Clarke", "Cooper", "Costa", "Dawson", "Delgado",
    "Donnelly", "Dunmore", "Edwards", "Ellison", "Fairbanks", "Farrell", "Fenwick", "Fischer", "Fletcher",
    "Gallagher", "Garrido", "Goldberg", "Granger", "Hadley", "Halvorsen", "Hamilton", "Harcourt", "Hartley",
    "Hendricks", "Holloway", "Hughes", "Ibrahim", "Jansen", "Kavanagh", "Keller", "Kowalski", "Lambert",
    "Langford", "Larsen", "Lindqvist", "Lockhart", "Lombardi", "McAllister", "Mendoza", "Merriweather",
    "Moreau", "Morrison", "Nakamura", "Nolan", "Novak", "Okafor", "Oliveira", "Osborne", "Pemberton",
    "Petrov", "Prescott", "Quinn", "Ramsey", "Reyes", "Rinaldi", "Rosenthal", "Sandoval", "Schofield",
    "Sharma", "Sinclair", "Sorensen", "Stanton", "Sutherland", "Tanaka", "Thornton", "Underwood", "Vance",
    "Varga", "Waddington", "Whitfield", "Wickham", "Winslow", "Yamamoto", "Zielinski",
)
PLACES = (
    ("Aberdeen", "Scotland"), ("Adelaide", "Australia"), ("Atlanta", "Georgia"), ("Belfast", "Northern Ireland"),
    ("Birmingham", "England"), ("Boston", "Massachusetts"), ("Brighton", "England"), ("Bristol", "England"),
    ("Cardiff", "Wales"), ("Chicago", "Illinois"), ("Cork", "Ireland"), ("Dallas", "Texas"),
    ("Denver", "Colorado"), ("Dublin", "Ireland"), ("Dundee", "Scotland"), ("Edinburgh", "Scotland"),
    ("Exeter", "England"), ("Glasgow", "Scotland"), ("Houston", "Texas"), ("Hull", "England"),
    ("Inverness", "Scotland"), ("Leeds", "England"), ("Leicester", "England"), ("Liverpool", "England"),
    ("London", "England"), ("Manchester", "England"), ("Melbourne", "Australia"), ("Miami", "Florida"),
    ("Nashville", "Tennessee"), ("Newcastle", "England"), ("Norwich", "England"), ("Nottingham", "England"),
    ("Oxford", "England"), ("Perth", "Australia"), ("Phoenix", "Arizona"), ("Plymouth", "England"),
    ("Portland", "Oregon"), ("Sacramento", "California"), ("Seattle", "Washington"), ("Sheffield", "England"),
    ("Southampton", "England"), ("Swansea", "Wales"), ("Sydney", "Australia"), ("Toronto", "Canada"),
    ("Vancouver", "Canada"), ("York", "England"), ("Winnipeg", "Canada"), ("Auckland", "New Zealand"),
)
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
    "November", "December",
)
BUILDINGS = (
    "town hall", "city hall", "courthouse", "council chamber", "community centre", "public library",
    "main station", "county offices", "civic centre", "old market hall",
)
TIMES_OF_DAY = ("early morning", "mid-morning", "lunchtime", "afternoon", "evening", "late evening")


TOPICS: tuple[Topic, ...] = (
    Topic(
        section="politics",
        roles=("mayor", "council leader", "deputy mayor", "housing chief", "council member", "transport chief"),
        orgs=(
            "City Council", "County Assembly", "Regional Parliament", "Treasury Committee", "Planning Board",
            "Electoral Commission", "Housing Authority",
        ),
        slots={
            "policy": (
                "a new housing scheme", "a ban on late-night deliveries", "free bus travel for pensioners",
                "a congestion charge", "a tax on empty homes", "a cap on rent increases",
                "a programme to plant new trees", "a freeze on council pay",
            ),
            "plan": (
                "rebuild three schools", "close the old hospital wing", "double the number of bike lanes",
                "cut business rates", "merge two police districts", "build a new bridge over the river",
            ),
            "vote": ("by-election", "referendum", "leadership contest", "mayoral race", "council vote"),
        },
        ledes=(
            "{person}, the {role} of {place}, announced on {day} that {policy} would begin within {n} months.",
            "Voters in {place} have chosen {person} as their new {role} after a {vote} won with {pct} per "
            "cent of the vote.",
            "The {org} in {place} has approved a plan to {plan}, ending a dispute that lasted {n} years.",
            "{person} has resigned as {role} of {place} after losing a {vote} by just {n3} votes.",
        ),
        facts=(
            "The plan is expected to cost {money} over the next {n2} years.",
            "{last} said the first changes would reach {big} households before the end of {year}.",
            "Opposition leader {person2} called the decision a serious mistake and promised to overturn it.",
            "Turnout reached {pct2} per cent, the highest figure in the region since {year_past}.",
            "The {org} voted {n2} to {n3} in favour after a debate lasting more than {n3} hours.",
            "Officials said {policy} would be reviewed again in {month} {year}.",
        ),
        fillers=(
            "The debate was broadcast live and watched by thousands of people across {country}.",
            "\"This is a good day for {place},\" {last} told reporters outside the {building}.",
            "Critics say {policy} does little for families who already struggle to pay their bills.",
            "Supporters argue that the change is long overdue and should have happened years ago.",
            "A petition against the plan collected {big2} signatures in less than a month.",
            "{last} first entered politics in {year_past} as a member of the local school board.",
            "Campaigners gathered outside the {building} holding banners and chanting slogans.",
            "\"We listened to every single person who wrote to us,\" {last} said.",
            "The proposal will now go before a second committee for detailed scrutiny.",
            "Several members of the {org} abstained, saying they needed more time to read the report.",
            "Business groups in {place} gave the announcement a cautious welcome.",
            "\"Shame on them!\" shouted one protester as the result was read out.",
            "Government figures show that spending in {place} fell by {pct2} per cent over the past decade.",
            "It is the biggest shake-up of local services in {place} for a generation.",
        ),
    ),
    Topic(
        section="sport",
        roles=("manager", "captain", "head coach", "striker", "goalkeeper", "team doctor"),
        orgs=(
            "Football Association", "Premier League", "Rugby Union", "Cricket Board", "Olympic Committee",
            "Tennis Federation", "Athletics Federation",
        ),
        slots={
            "team": (
                "{place} United", "{place} Rovers", "{place} City", "{place} Athletic", "{place} Wanderers",
                "{place} Rangers",
            ),
            "rival": (
                "Harbour Town", "Kingsbridge Albion", "Westfield Park", "Riverside Orient", "Northgate Vale",
                "Eastmoor Villa", "Millbrook Celtic", "Southport Forest",
            ),
            "cup": (
                "league title", "regional cup", "national championship", "European trophy", "winter series",
                "indoor championship",
            ),
            "injury": ("a broken ankle", "a hamstring strain", "a knee injury", "a dislocated shoulder",
                       "a fractured wrist", "concussion"),
        },
        ledes=(
            "{team} won the {cup} on {day} after beating {rival} {score}-{score2} in front of {big} fans.",
            "{person}, the {team} {role}, has signed a new contract worth {money} over {n2} years.",
            "{team} have sacked their {role} {person} after a run of {n} defeats in {n3} games.",
            "{person} scored twice as {team} came from behind to beat {rival} in the {cup} final.",
        ),
        facts=(
            "The victory was the club's first in the {cup} since {year_past}.",
            "{last} will miss the rest of the season with {injury}, the club confirmed.",
            "The {org} said it would investigate crowd trouble after the final whistle.",
            "{person2} has been named interim {role} until the end of the season.",
            "Ticket sales for the next home game have risen by {pct} per cent.",
            "{team} are now {n2} points clear at the top of the table with {n3} games left.",
        ),
        fillers=(
            "\"What a night!\" {last} said afterwards. \"The fans were incredible from start to finish.\"",
            "The visitors had the better of the opening half but failed to take their chances.",
            "Rain fell throughout the second half, making the pitch heavy and slippery.",
            "Former player {person3} described the result as one of the best in the club's history.",
            "The stadium, which holds {big2} people, was sold out for the first time this season.",
            "{rival} had not lost at home for more than {n3} months before the match.",
            "A minute's applause was held before kick-off in memory of a former club president.",
            "The referee showed {n2} yellow cards and one red card during a bad-tempered game.",
            "\"We never stopped believing,\" said {last}. \"This group of players never gives up.\"",
            "Supporters celebrated in the streets of {place} until the early hours.",
            "The club's owners have promised to spend heavily in the summer transfer window.",
            "Bookmakers had given {team} little chance of winning before the tournament began.",
            "Highlights of the game were shown on national television on {day2} evening.",
            "Training resumes on {day2} ahead of a difficult away trip next weekend.",
        ),
    ),
    Topic(
        section="weather",
        roles=("forecaster", "emergency manager", "fire chief", "coastguard officer", "flood warden"),
        orgs=(
            "Met Office", "National Weather Service", "Environment Agency", "Coastguard", "Fire and Rescue Service",
            "Highways Agency",
        ),
        slots={
            "storm": ("Storm Agnes", "Storm Bertram", "Storm Cora", "Storm Dorian", "Storm Edith", "Storm Fergus",
                      "Hurricane Gwen", "Tropical Storm Hector"),
            "hazard": ("flooding", "heavy snow", "gale-force winds", "a heatwave", "thick fog", "black ice",
                       "a severe thunderstorm", "hailstones the size of golf balls"),
            "warning": ("amber", "red", "yellow"),
        },
        ledes=(
            "{storm} brought {hazard} to {place} on {day}, leaving {big} homes without power.",
            "Forecasters have issued a {warning} warning for {place} as {hazard} is expected on {day}.",
            "Temperatures in {place} reached {temp} degrees on {day}, the highest ever recorded in {month}.",
            "More than {big} people were told to leave their homes in {place} as {hazard} swept the area.",
        ),
        facts=(
            "Wind gusts of up to {n2} miles per hour were recorded along the coast.",
            "The {org} said {n} flood warnings remained in place on {day2} night.",
            "Rescue teams saved {n3} people who were trapped in cars by rising water.",
            "Damage to roads and bridges is expected to cost at least {money}.",
            "Train services between {place} and {place2} were cancelled for the rest of the day.",
            "{person2} of the {org} warned that conditions could get worse over the weekend.",
        ),
        fillers=(
            "\"I have lived here for {n3} years and I have never seen anything like it,\" said {person3}.",
            "Sandbags were handed out at the {building} throughout the {time_of_day}.",
            "Drivers were urged not to travel unless their journey was absolutely necessary.",
            "Schools in the area closed early so that children could get home safely.",
            "Pictures shared online showed fallen trees blocking several main roads.",
            "Farmers said the weather had already ruined much of this year's harvest.",
            "The last comparable event in {place} was in {year_past}, when the river burst its banks.",
            "Emergency shelters have been opened in {place2} for anyone who needs somewhere to stay.",
            "\"Stay indoors and stay safe!\" the {org} said in a message posted on {day}.",
            "Engineers worked through the night to restore electricity to the worst-hit streets.",
            "Insurers expect thousands of claims once the water has gone down.",
            "Conditions are expected to improve slowly from {day2}, forecasters said.",
            "Volunteers brought hot drinks and blankets to families waiting at the {building}.",
            "Scientists say extreme weather of this kind is becoming more common.",
        ),
    ),
    Topic(
        section="business",
        roles=("chief executive", "finance director", "founder", "chairman", "chief economist"),
        orgs=(
            "Northwind Logistics", "Bramble Foods", "Castlegate Bank", "Silverline Motors", "Harbourview Energy",
            "Quill Technologies", "Maple Street Retail", "Ironbridge Steel", "Bluebell Airlines",
        ),
        slots={
            "product": ("electric van", "budget phone", "frozen ready meal", "smart thermostat",
                        "savings account", "solar panel", "delivery app", "family car"),
            "change": ("rose", "fell", "jumped", "slumped", "climbed", "dropped"),
            "market": ("stock market", "housing market", "jobs market", "energy market", "retail sector"),
        },
        ledes=(
            "{org} has announced plans to cut {big} jobs after profits {change} by {pct} per cent.",
            "{org} will open a new factory in {place}, creating {big} jobs over the next {n} years.",
            "Shares in {org} {change} {pct} per cent on {day} after the company launched a new {product}.",
            "{org} has agreed to buy its rival {org2} in a deal worth {money}.",
        ),
        facts=(
            "Annual sales reached {money}, up from {money2} a year earlier.",
            "{person}, the company's {role}, said the decision had been very difficult.",
            "The company employs {big2} people across {n2} sites in {country}.",
            "Unions said they would ballot members on strike action in {month}.",
            "The new {product} will go on sale in {month} at a price of {price}.",
            "Analysts expect the {market} to remain weak until at least {year}.",
        ),
        fillers=(
            "\"We have to adapt to a changing world,\" {last} said in a statement.",
            "The firm was founded in {place} in {year_past} and began as a small family business.",
            "Customers have complained about rising prices and long waiting times.",
            "Rivals have already announced similar cost-cutting measures this year.",
            "The {market} has had a difficult year, with higher costs hitting profits.",
            "Staff were told the news at a meeting held on {day2} {time_of_day}.",
            "Local politicians urged the company to protect as many jobs as possible.",
            "The board will meet again in {month} to discuss the next steps.",
            "Investors welcomed the news, although some questioned the timing.",
            "\"This is a brilliant result for everyone involved!\" said one shareholder.",
            "Economists say consumer confidence is at its lowest level for {n3} years.",
            "The company's annual report is due to be published later this month.",
            "{person3}, an analyst at {org2}, said the plan was bold but risky.",
            "Several suppliers in {place2} depend on the firm for most of their orders.",
        ),
    ),
    Topic(
        section="science",
        roles=("professor", "lead researcher", "astronomer", "marine biologist", "geologist", "chemist"),
        orgs=(
            "University of {place}", "Royal Institute of Science", "National Space Agency", "Marine Research Centre",
            "Institute of Genetics", "Polar Research Unit",
        ),
        slots={
            "finding": (
                "a new species of deep-sea fish", "water ice beneath the surface of a distant moon",
                "a dinosaur skeleton almost complete from head to tail", "a gene linked to longer life in mice",
                "a comet that returns every {n2} years", "an ancient shipwreck carrying silver coins",
                "a frog that can survive being frozen", "a battery that charges in under a minute",
            ),
            "journal": ("Nature", "Science", "the Journal of Applied Physics", "the Marine Biology Review",
                        "the Annals of Geology"),
            "instrument": ("telescope", "microscope", "submarine robot", "weather balloon", "satellite",
                           "drilling rig"),
        },
        ledes=(
            "Scientists at the {org} say they have discovered {finding}.",
            "A team led by {person} has found {finding}, according to a study published in {journal}.",
            "Researchers in {place} have used a new {instrument} to detect {finding}.",
            "{person}, a {role} at the {org}, has identified {finding} after a {n}-year search.",
        ),
        facts=(
            "The discovery was made using a {instrument} that cost {money} to build.",
            "The team studied {big} samples collected over {n2} years.",
            "{last} said the finding could change how scientists understand life on Earth.",
            "The results will be tested again by an independent laboratory in {place2}.",
            "Funding for the project was cut by {pct} per cent in {year_past}, slowing the work.",
            "The findings were confirmed by {n3} separate teams of scientists.",
        ),
        fillers=(
            "\"We were amazed when we saw the first results!\" {last} said.",
            "The research took place in conditions that were often cold and dangerous.",
            "Other experts urged caution, saying that more work was needed.",
            "Similar claims have been made in the past and later turned out to be wrong.",
            "The {instrument} sends data back to a control room in {place} every {n3} minutes.",
            "Students from the university helped to sort and label the samples.",
            "\"Science moves slowly, and that is how it should be,\" said {person3}.",
            "The study was paid for by a charity and a group of private donors.",
            "A public exhibition about the work will open in {place} in {month}.",
            "The team plans to publish all of its data so that others can check it.",
            "The first hints of the discovery appeared in {year_past} but were ignored at the time.",
            "Children at a local school have been invited to suggest a name for the find.",
            "Some of the equipment had to be carried by hand for the last {n3} miles.",
            "{last} has spent most of a long career working on the problem.",
        ),
    ),
    Topic(
        section="crime",
        roles=("detective inspector", "chief constable", "prosecutor", "judge", "police spokesman"),
        orgs=("Metropolitan Police", "Crown Court", "County Police", "Serious Fraud Office", "High Court",
              "Border Force"),
        slots={
            "crime": ("a jewellery shop robbery", "a series of burglaries", "an art theft", "a bank fraud",
                      "a car theft ring", "a cyber attack on the council", "the theft of rare books"),
            "item": ("paintings", "diamond rings", "laptops", "sports cars", "rare stamps", "gold watches"),
            "sentence": ("six years", "eight months", "three years", "life", "two years", "ten years"),
        },
        ledes=(
            "Police in {place} have arrested {n} people in connection with {crime}.",
            "{person} has been jailed for {sentence} for {crime} in {place}.",
            "Thieves stole {item} worth {money} from a house in {place} on {day} night.",
            "A {age}-year-old man has been charged after {crime} in {place} last {month}.",
        ),
        facts=(
            "Detectives recovered {item} worth {money2} from a garage in {place2}.",
            "The court heard that the gang had planned the raid for {n2} months.",
            "{person2}, the {role} leading the case, appealed for witnesses to come forward.",
            "The {org} said the investigation was one of the largest in its history.",
            "The victims have been offered support by a local charity.",
            "{last} will be sentenced at a later date, the judge said.",
        ),
        fillers=(
            "\"This was a cruel and carefully planned crime,\" the judge said.",
            "CCTV footage released by police shows {n2} figures running from the building.",
            "Neighbours said they heard a loud bang at around {hour} o'clock.",
            "\"I just want my things back!\" one victim told the court in a statement.",
            "Officers searched {n3} addresses across {place2} on {day2} {time_of_day}.",
            "The case was adjourned twice while lawyers argued about the evidence.",
            "Anyone with information is asked to call the police or contact the charity anonymously.",
            "The defence said its client had been under pressure from others.",
            "Police have increased patrols in the area while inquiries continue.",
            "Crime in {place} has fallen by {pct2} per cent over the past {n3} years.",
            "The shop owner, {person3}, said the business would reopen next week.",
            "A reward of {price} has been offered for information leading to a conviction.",
            "Forensic teams spent {n3} days examining the scene.",
            "The trial heard evidence from more than {n2} witnesses.",
        ),
    ),
    Topic(
        section="health",
        roles=("chief medical officer", "consultant surgeon", "head nurse", "public health director", "GP"),
        orgs=("National Health Service", "General Hospital", "Public Health Agency", "Medical Council",
              "Heart Foundation", "Children's Hospital Trust"),
        slots={
            "condition": ("measles", "heart disease", "type 2 diabetes", "flu", "asthma", "food poisoning",
                          "a rare blood disorder"),
            "treatment": ("a new vaccine", "a daily tablet", "a simple blood test", "a robotic operation",
                          "a nasal spray", "a gene therapy"),
        },
        ledes=(
            "Doctors in {place} say {treatment} has cut hospital admissions for {condition} by {pct} per cent.",
            "Cases of {condition} in {place} have risen to {big}, health officials said on {day}.",
            "The {org} has approved {treatment} for patients with {condition}.",
            "{person}, a {role} in {place}, has warned that waiting lists have reached {big}.",
        ),
        facts=(
            "The treatment costs about {price} per patient and will be offered from {month}.",
            "Around {big2} patients are expected to benefit in the first year.",
            "{last} urged parents to make sure their children were fully protected.",
            "The trial followed {n2} hundred volunteers for {n3} months.",
            "Hospital managers said an extra {n2} beds would open by {month}.",
            "The {org} said there was no need for panic but asked people to stay alert.",
        ),
        fillers=(
            "\"It has changed my life,\" said {person3}, one of the first patients to try it.",
            "Staff at the hospital have been working extra shifts to cope with demand.",
            "The symptoms include a high temperature, tiredness and a persistent cough.",
            "Experts say regular exercise and a healthy diet remain the best protection.",
            "A helpline has been set up for anyone who is worried about their health.",
            "The hospital in {place} was built in {year_past} and is now badly in need of repair.",
            "Pharmacies in {place2} reported running low on some medicines this week.",
            "\"Please, please get checked!\" {last} said in a video shared online.",
            "Visiting hours on some wards have been cut to reduce the risk of infection.",
            "The study did not find any serious side effects.",
            "Nurses say the pressure on the service has never been greater.",
            "The figures will be reviewed by an independent panel in {month}.",
            "Families have been asked to keep children at home if they feel unwell.",
            "Campaigners want the treatment to be offered to everyone who needs it.",
        ),
    ),
    Topic(
        section="culture",
        roles=("director", "author", "singer", "actor", "museum curator", "festival organiser"),
        orgs=("National Gallery", "Royal Theatre", "City Museum", "Film Academy", "Book Prize Committee",
              "Music Festival Trust"),
        slots={
            "work": ("a new novel", "a film about the sea", "an album of folk songs", "a comedy play",
                     "a photography exhibition", "a ballet", "a children's book", "a television drama"),
            "award": ("best new writer", "best actress", "album of the year", "best director", "lifetime achievement"),
            "venue": ("Palace Theatre", "Riverside Arena", "Old Corn Exchange", "Harbour Hall", "Grand Pavilion"),
        },
        ledes=(
            "{person} has won the award for {award} for {work} at a ceremony in {place}.",
            "The {org} in {place} will reopen on {day} after a {money} renovation.",
            "{person}, the {role}, has announced {work} that will be released in {month}.",
            "More than {big} people visited the {venue} in {place} to see {work}.",
        ),
        facts=(
            "The prize includes a cheque for {price} and a trophy made of glass.",
            "Tickets for the opening night sold out in {n2} minutes.",
            "{last} thanked family and friends in a short speech.",
            "The project took {n3} years to complete and involved more than {n2} people.",
            "Critics have praised the work as bold, funny and moving.",
            "The {org} expects to welcome {big2} visitors in its first year.",
        ),
        fillers=(
            "\"I honestly did not expect this!\" {last} said as the audience cheered.",
            "The ceremony was hosted by the comedian {person3}.",
            "Other nominees included a first-time author and a well-known musician.",
            "The building first opened its doors in {year_past}.",
            "Visitors can book tickets online or at the box office at the {venue}.",
            "{last} grew up in {place2} and began writing as a teenager.",
            "The evening ended with a performance by a local choir.",
            "Some critics said the work was too long, but audiences loved it.",
            "\"Art belongs to everyone,\" said the {role} in an interview on {day2}.",
            "A tour of {n3} cities is planned for next year.",
            "Rehearsals took place in a church hall because the main stage was being repaired.",
            "The event raised {price} for a charity that supports young artists.",
            "Photographs from the night were shared thousands of times on social media.",
            "The {venue} will host a series of free events for schools in {month}.",
        ),
    ),
)

GENERIC_FILLERS = (
    "Officials did not respond to a request for comment on {day2} evening.",
    "It is not the first time that {place} has made headlines this year.",
    "\"People want answers, and they want them now,\" said {person3}, who has lived in the area for {n3} years.",
    "The news was shared widely on social media, where one post was viewed more than {big2} times.",
    "Further details are expected to be released later this week.",
    "The announcement comes just weeks after a similar story in {place2}.",
    "\"We have never seen anything like it!\" said one resident, who asked not to be named.",
    "Local newspapers have covered the story on their front pages every day this week.",
    "{person3}, a spokesman for the {org}, said the group would study the details carefully.",
    "The area has a population of around {big2} people.",
    "A full report will be published in {month}, officials said.",
    "Many residents said they had only heard about the news from friends and neighbours.",
    "The {building} remained busy until late in the evening.",
    "\"It is a story that affects all of us,\" said {person3}.",
    "A public meeting to discuss the matter has been arranged for {day2}.",
    "Some people questioned why it had taken so long for anyone to act.",
    "Figures released last year showed a similar pattern across {country}.",
    "The mood in {place} on {day2} was described as calm but uncertain.",
    "Further questions are likely to be raised when the {org} meets next month.",
    "Reporters were kept behind a barrier outside the {building}.",
    "\"Nobody could have predicted this,\" one local business owner said.",
    "The story has drawn interest from as far away as {place2}.",
    "Earlier this year a smaller group raised similar concerns, but little changed.",
    "Several people were seen taking photographs outside the {building} on {day2} {time_of_day}.",
    "\"Enough is enough!\" read one handwritten sign.",
    "It is expected to be several weeks before the full picture is clear.",
    "{person3} said: \"We will keep going until we get it right.\"",
    "An online fundraising page had raised {price} by {day2} night.",
    "Records show a similar case in {place} in {year_past}.",
    "Neither side would say when talks were likely to resume.",
    "A follow-up meeting is planned for the spring, according to people familiar with the plans.",
    "Road closures around the {building} caused long delays for commuters on {day2} {time_of_day}.",
    "\"Why did nobody tell us?\" asked {person3}, whose family has lived nearby since {year_past}.",
    "The local radio station took calls from listeners about the story for most of the day.",
    "Leaders in {place2} said they were watching events closely.",
    "{person3} said the decision would be remembered for years to come.",
)
# fmt: on


# --------------------------------------------------------------------------------------------------------------
# Story composition
# --------------------------------------------------------------------------------------------------------------


def _person(rng: random.Random) -> tuple[str, str]:
    """A made-up full name and its surname."""
    last = rng.choice(LAST_NAMES)
    return f"{rng.choice(FIRST_NAMES)} {last}", last


def _money(rng: random.Random) -> str:
    """An amount in pounds or dollars, written the way news copy writes it."""
    currency = rng.choice("£$")
    if rng.random() < 0.6:
        return f"{currency}{rng.randint(1, 99)}.{rng.randint(1, 9)} million"
    if rng.random() < 0.5:
        return f"{currency}{rng.randint(1, 9)}.{rng.randint(1, 9)} billion"
    return f"{currency}{rng.randint(10, 999) * 1000:,}"


def _story_slots(rng: random.Random, topic: Topic) -> dict[str, str]:
    """Every slot value one story uses, drawn once so names and places stay consistent through the story."""
    person, last = _person(rng)
    person2, last2 = _person(rng)
    person3, _ = _person(rng)
    (place, country), (place2, _) = rng.sample(PLACES, 2)
    org, org2 = rng.sample(topic.orgs, 2)
    year = rng.randint(2008, 2016)
    slots = {
        "person": person,
        "last": last,
        "person2": person2,
        "last2": last2,
        "person3": person3,
        "place": place,
        "place2": place2,
        "country": country,
        "org": org.format(place=place),
        "org2": org2.format(place=place2),
        "role": rng.choice(topic.roles),
        "day": rng.choice(DAYS),
        "day2": rng.choice(DAYS),
        "month": rng.choice(MONTHS),
        "year": str(year),
        "year_past": str(rng.randint(1952, year - 2)),
        "n": str(rng.randint(2, 12)),
        "n2": str(rng.randint(3, 40)),
        "n3": str(rng.randint(2, 90)),
        "score": str(rng.randint(2, 5)),
        "score2": str(rng.randint(0, 1)),
        "age": str(rng.randint(18, 74)),
        "hour": str(rng.randint(1, 12)),
        "temp": str(rng.randint(31, 44)),
        "big": f"{rng.randint(12, 980) * rng.choice((10, 100, 1000)):,}",
        "big2": f"{rng.randint(1, 999) * rng.choice((100, 1000)):,}",
        "money": _money(rng),
        "money2": _money(rng),
        "price": f"{rng.choice('£$')}{rng.randint(5, 950) * rng.choice((1, 10, 100)):,}",
        "pct": str(rng.randint(3, 68)),
        "pct2": str(rng.randint(12, 89)),
        "building": rng.choice(BUILDINGS),
        "time_of_day": rng.choice(TIMES_OF_DAY),
    }
    for name, choices in topic.slots.items():
        slots[name] = rng.choice(choices).format(**slots)
    return slots


def _dateline(rng: random.Random, slots: dict[str, str], publisher: str) -> str:
    """The story's opening credit line: CNN's city dateline or the Daily Mail's byline and timestamps."""
    if publisher == "cnn":
        return f"{slots['place'].upper()}, {slots['country']} (CNN) -- "
    reporter, _ = _person(rng)
    day, hour, minute = rng.randint(1, 28), rng.randint(0, 23), rng.randint(0, 59)
    date = f"{day} {slots['month']} {slots['year']}"
    return (
        f"By . {reporter} . PUBLISHED: . {hour:02d}:{minute:02d} EST, {date} . | . "
        f"UPDATED: . {(hour + 2) % 24:02d}:{minute:02d} EST, {date} . "
    )


def _story_url(rng: random.Random, slots: dict[str, str], topic: Topic, publisher: str, index: int) -> str:
    """A made-up story URL; its sha1 becomes the row ``id`` as in the real dataset."""
    words = f"{slots['last']} {slots['place']} {topic.section}".lower().split()
    if publisher == "cnn":
        month = rng.randint(1, 12)
        day = rng.randint(1, 28)
        return (
            f"http://edition.cnn.com/{slots['year']}/{month:02d}/{day:02d}/{topic.section}/{'.'.join(words)}/index.html"
        )
    article_number = 1_000_000 + 7 * index + rng.randint(0, 6)
    return f"http://www.dailymail.co.uk/news/article-{article_number}/{'-'.join(w.title() for w in words)}.html"


def _highlight_line(sentence: str) -> str:
    """Write a key sentence as a CNN/DailyMail highlight: final full stop detached as `` .``."""
    return sentence[:-1] + " ."


def compose_story(rng: random.Random, index: int) -> dict[str, str]:
    """One synthetic row: an article whose key sentences (lede + 1-2 facts) reappear as its highlights."""
    topic = rng.choice(TOPICS)
    publisher = "cnn" if rng.random() < 0.6 else "dailymail"
    slots = _story_slots(rng, topic)
    lede = rng.choice(topic.ledes).format(**slots)
    facts = [template.format(**slots) for template in rng.sample(topic.facts, rng.choice((1, 1, 2)))]
    long_article = rng.random() < LONG_ARTICLE_PROBABILITY
    filler_count = rng.randint(36, 48) if long_article else rng.randint(2, 15)
    filler_pool = topic.fillers + GENERIC_FILLERS
    fillers = [template.format(**slots) for template in rng.sample(filler_pool, filler_count)]
    # Key facts sit among the fillers in reading order, mostly early, as in news writing.
    positions = sorted(rng.sample(range(min(len(fillers), 8) + 1), len(facts)))
    body = list(fillers)
    for offset, (position, fact) in enumerate(zip(positions, facts, strict=True)):
        body.insert(position + offset, fact)
    article = _dateline(rng, slots, publisher) + " ".join([lede, *body])
    highlights = "\n".join(_highlight_line(sentence) for sentence in [lede, *facts])
    url = _story_url(rng, slots, topic, publisher, index)
    return {"article": article, "highlights": highlights, "id": hashlib.sha1(url.encode()).hexdigest()}


def compose_splits(seed: int = SEED) -> dict[str, list[dict[str, str]]]:
    """All rows of every split, from one seeded generator so the output never changes."""
    rng = random.Random(seed)
    splits: dict[str, list[dict[str, str]]] = {}
    index = 0
    for split, count in SPLIT_ROWS.items():
        splits[split] = [compose_story(rng, index + i) for i in range(count)]
        index += count
    ids = [row["id"] for rows in splits.values() for row in rows]
    if len(set(ids)) != len(ids):
        raise ValueError(f"seed {seed} produced {len(ids) - len(set(ids))} duplicate ids; choose another SEED")
    return splits


# --------------------------------------------------------------------------------------------------------------
# Writing: parquet in the hub layout, README with the config, tokenizer
# --------------------------------------------------------------------------------------------------------------

DATASET_README = """\
---
language:
- en
license: apache-2.0
pretty_name: Synthetic CNN/DailyMail sample
task_categories:
- summarization
dataset_info:
- config_name: 3.0.0
  features:
  - name: article
    dtype: string
  - name: highlights
    dtype: string
  - name: id
    dtype: string
configs:
- config_name: 3.0.0
  data_files:
  - split: train
    path: 3.0.0/train-*
  - split: validation
    path: 3.0.0/validation-*
  - split: test
    path: 3.0.0/test-*
---

# Synthetic CNN/DailyMail sample

Made-up news stories in the layout and format of the Hugging Face `abisee/cnn_dailymail` dataset (config
`3.0.0`; columns `article`, `highlights`, `id`), small enough to ship with `llama_ft` and train on a CPU.
No real article is included: every story is composed from invented names and sentence templates, and each
highlight line is a key sentence of its article.

Splits: {counts}.

Regenerate (deterministic, byte for byte) with `python -m tools.make_sample`.
"""

PARQUET_SCHEMA = pa.schema([("article", pa.string()), ("highlights", pa.string()), ("id", pa.string())])


def _write_parquet(rows: Sequence[dict[str, str]], path: Path) -> None:
    """Write rows with a fixed schema and codec so the bytes depend only on the rows."""
    columns = {name: [row[name] for row in rows] for name in PARQUET_SCHEMA.names}
    table = pa.table(columns, schema=PARQUET_SCHEMA)
    pq.write_table(table, path, compression="zstd", compression_level=9)


def write_dataset(splits: dict[str, list[dict[str, str]]], dataset_dir: Path) -> None:
    """Lay the splits out as the hub repo does: ``3.0.0/<split>-0000i-of-0000n.parquet`` plus README."""
    config_dir = dataset_dir / SAMPLE_CONFIG_NAME
    config_dir.mkdir(parents=True, exist_ok=True)
    for split, file_stems in SPLIT_FILES.items():
        rows = splits[split]
        shard = -(-len(rows) // len(file_stems))
        for i, stem in enumerate(file_stems):
            _write_parquet(rows[i * shard : (i + 1) * shard], config_dir / f"{stem}.parquet")
    counts = ", ".join(f"{split} {len(rows):,} rows" for split, rows in splits.items())
    (dataset_dir / "README.md").write_text(DATASET_README.format(counts=counts), encoding="utf-8")


def train_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer shaped like Llama 3's: same split regex, special tokens, BOS-only template.

    As with Llama 3, encoding prepends ``<|begin_of_text|>``, appends no EOS, and no pad token is set.
    """
    tokenizer = Tokenizer(models.BPE(ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    if tokenizer.get_vocab_size() != VOCAB_SIZE:
        raise ValueError(
            f"trained vocabulary has {tokenizer.get_vocab_size()} tokens, need {VOCAB_SIZE}: the sample text is "
            "too uniform for that many merges; enlarge the vocabularies in make_sample.py"
        )
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN} $A",
                pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
                special_tokens=[(BOS_TOKEN, SPECIAL_TOKENS.index(BOS_TOKEN))],
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=MODEL_MAX_LENGTH,
    )


def write_sample(out_dir: Path) -> None:
    """Write the dataset (``out_dir/cnn_dailymail``) and tokenizer (``out_dir/tokenizer``), deterministically."""
    splits = compose_splits()
    write_dataset(splits, out_dir / SAMPLE_DATASET_DIR.name)
    texts = (text for row in splits["train"] for text in (row["article"], row["highlights"]))
    tokenizer_dir = out_dir / SAMPLE_TOKENIZER_DIR.name
    train_tokenizer(texts).save_pretrained(tokenizer_dir)
    # Name the class as Meta's Llama 3 files do: transformers 4.x has no "TokenizersBackend" (5.x's name).
    config_path = tokenizer_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _percentiles(values: Sequence[int]) -> str:
    """mean / p50 / p95 / max of a list of lengths, for the CLI summary."""
    ordered = sorted(values)
    p50, p95 = ordered[len(ordered) // 2], ordered[int(len(ordered) * 0.95)]
    return f"mean {sum(ordered) / len(ordered):.0f}, p50 {p50}, p95 {p95}, max {ordered[-1]}"


def main() -> None:
    """Rebuild the shipped sample in place and print what was written."""
    write_sample(SAMPLE_DIR)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(SAMPLE_TOKENIZER_DIR)
    summary = {}
    for path in sorted((SAMPLE_DATASET_DIR / SAMPLE_CONFIG_NAME).glob("*.parquet")):
        table = pq.read_table(path)
        summary[path.name] = f"{table.num_rows} rows, {path.stat().st_size:,} bytes"
    print(json.dumps(summary, indent=2))
    train = compose_splits()["train"]
    for column in ("article", "highlights"):
        lengths = [len(ids) for ids in tokenizer([row[column] for row in train])["input_ids"]]
        long_share = sum(length > 600 for length in lengths) / len(lengths)
        print(f"train {column} tokens: {_percentiles(lengths)}, over 600: {long_share:.1%}")
    print(f"wrote {SAMPLE_DATASET_DIR} and {SAMPLE_TOKENIZER_DIR}")


if __name__ == "__main__":
    main()
