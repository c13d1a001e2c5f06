"""Instruction/chat conversations built from the stories, for no particular test prompt.

Each train story becomes a few conversations of randomly chosen tasks, each phrased in one of several ways:
write a story about a topic taken from the story (sometimes with words it uses), continue its opening,
begin with its opening, copy a sentence out of it (first, last, "repeat after me"), say who it is about,
and multi-turn ones: tell that story again, tell another one, quote your own story. Greetings get a short
canned reply, and book paragraphs give "continue this passage". A system prompt is added sometimes.
Every reply is text from the corpus (or a fact read off it), so the model learns to follow the request
and to copy from the conversation, which n-gram (prompt-lookup) speculation also rewards.
"""

from __future__ import annotations

import random
import re
from collections import Counter

from .corpus import opening, sentences

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a friendly storyteller for young children.",
    "You are Helix, a small story model. You write short, simple stories.",
    "Use simple words that a small child knows.",
    "You are a kind assistant who loves stories.",
    "Answer the user's request.",
    "You write bedtime stories.",
    "Keep your answers short and happy.",
]

GREETINGS = ["Hi!", "Hello.", "Hello!", "Hi there.", "Hey!", "Good morning!", "Hello, who are you?", "What can you do?",
             "Hi! What can you do?", "Who are you?"]
GREETING_REPLIES = [
    "Hello! I am a small story model. Ask me for a story, for example: Write a story about a cat named Tom.",
    "Hi! I can write short stories for children. What should the story be about?",
    "Hello! I like to tell stories. Tell me who or what the story should be about.",
    "I am a small model that writes simple stories. Ask me to tell you one!",
]

WRITE = [
    'Write a short story about {topic} that uses the words "{a}" and "{b}".',
    "Write a story about {topic}.",
    "Tell me a story about {topic}.",
    "Can you tell me a short story about {topic}?",
    "Write a children's story that includes the words {a}, {b} and {c}.",
    'Please write a bedtime story about {topic}. Use the word "{a}".',
    "I want a story about {topic}.",
    "Write a story for a small child about {topic}, with the words {a} and {b}.",
    "Tell me a story with the words {a} and {b} in it.",
    "Could you write a simple story about {topic}?",
    "Make up a story about {topic}.",
    "story about {topic}",
]
CONTINUE = [
    "Continue this story: {opening}",
    "Finish this story.\n\n{opening}",
    'Here is the start of a story: "{opening}" What happens next?',
    "Please continue the story.\n{opening}",
    "Go on with this story: {opening}",
]
BEGIN_WITH = [
    'Write a story that begins with "{opening}"',
    "Write a story that starts like this: {opening}",
    "Tell me a story. Start with: {opening}",
]
FIRST_SENTENCE = ["Repeat the first sentence of this story.", "What is the first sentence of this story?",
                  "Copy the first sentence of the story.", "Tell me only the first sentence."]
LAST_SENTENCE = ["Repeat the last sentence of this story.", "What is the last sentence of this story?",
                 "Copy the last sentence of the story.", "How does the story end? Give the last sentence."]
WHO = ["Who is this story about?", "Who is the story about?", "Who is the main character of this story?"]
NAME = ["What is the name of the {noun} in this story?", "What is the {noun} called in this story?"]
REPEAT = ["Repeat after me: {s}", 'Say this back to me: "{s}"', "Please repeat this sentence: {s}",
          "Copy this sentence exactly: {s}"]
AGAIN = ["Tell that story again.", "Can you tell it again?", "Please repeat the story.", "Tell me the same story again.",
         "I liked it! Tell it again, please."]
ANOTHER = ["Now tell me another one about {topic}.", "Now write one about {topic}.",
           "Thank you! Can you tell me another story about {topic}?", "Another one, please, about {topic}."]
OWN_FIRST = ["What was the first sentence of your story?", "Repeat the first sentence of your story."]
OWN_LAST = ["What was the last sentence of your story?", "How did your story end? Repeat the last sentence."]
PASSAGE = ["Continue this passage: {opening}", "Continue the text.\n\n{opening}", "What comes next? {opening}"]

STOP = set("""a an the and or but so if then than that this these those there here it its it's he she they them
his her hers their we our you your i me my mine to of in on at by for with from up down out over under into onto
about after before again all also am are as be been being both can could did do does doing done each even ever
every few had has have having how just like made make many more most much must never no not now off once only
other own said same saw say says see seen should some still such too very was were what when where which while who
whom why will with would yes one two day time upon once way lot lots thing things went got get go going came come
very really always little big felt feel looked look wanted want knew know thought think let let's told tell asked
ask did didn't don't can't wasn't away back around something anything everything nothing someone everyone because
around while inside outside together other another""".split())
NOT_TOPIC = STOP | set("""happy sad good bad best new old fun kind nice small tiny huge great more last first next
mom dad mommy daddy friend friends family home house room park day end sky sun idea way time brown red blue green
yellow pink purple white black orange gold golden silver three four five six seven eight nine ten beautiful pretty
special favorite favourite scary strong fast slow loud quiet soft hard warm cold hot dark bright shiny long tall short
whole lovely wonderful magic magical funny silly brave clever smart curious busy lazy young older bigger biggest
mother father sister brother deep matching""".split())
MASS = set("water soup ice food milk juice rain snow sand grass paint mud bread candy cake honey music money fire gold".split())
_NAMED = re.compile(r"\b(an?) ((?:[a-z]+ ){0,2}[a-z]+) named ([A-Z][a-z]+)\b")
_AFTER_DET = re.compile(r"\b(?:[Aa]n?|[Tt]he|[Hh]is|[Hh]er|[Tt]heir) ([a-z]{3,})\b")
_WORD = re.compile(r"\b[a-z]{4,}\b")


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


class StoryFacts:
    """What the tasks read off one story: sentences, opening and continuation, a topic, some of its words."""

    def __init__(self, story: str, rng: random.Random):
        self.story = story.strip()
        paragraphs = [p for p in self.story.split("\n") if p.strip()]
        self.first = (sentences(paragraphs[0]) or [paragraphs[0]])[0]
        self.last = (sentences(paragraphs[-1]) or [paragraphs[-1]])[-1]
        self.sentences = [s for p in paragraphs for s in sentences(p)]
        self.opening = opening(self.story)
        self.rest = self.story[len(self.opening):].strip() if self.story.startswith(self.opening) else ""
        m = _NAMED.search(self.story)
        self.character = m.group(0) if m else None  # "a little girl named Lily"
        self.noun, self.name = (m.group(2), m.group(3)) if m else (None, None)
        counts = Counter(w for w in _AFTER_DET.findall(self.story) if w not in NOT_TOPIC)
        thing = counts.most_common(1)[0][0] if counts and counts.most_common(1)[0][1] >= 2 else None
        plural = thing and thing.endswith("s") and not thing.endswith(("ss", "us"))
        thing_topic = (thing if plural or thing in MASS else f"{article(thing)} {thing}") if thing else None
        options = [(t, w) for t, w in ((self.character, 2), (thing_topic, 1)) if t]  # the named character first
        if self.character and thing_topic and self.noun != thing:
            options.append((f"{self.character} and {thing_topic}", 1))
        self.topic = rng.choices([t for t, _ in options], [w for _, w in options])[0] if options else None
        words = sorted({w for w in _WORD.findall(self.story) if w not in STOP and w != thing})
        rng.shuffle(words)
        self.words = words[:3]


def _with_story(story: str, question: str, rng: random.Random) -> str:
    form = rng.randrange(3)
    if form == 0:
        return f"{story}\n\n{question}"
    if form == 1:
        return f"{question}\n\n{story}"
    return f"Story: {story}\n\n{question}"


def _write_request(f: StoryFacts, rng: random.Random) -> str | None:
    usable = [t for t in WRITE if ("{topic}" not in t or f.topic) and
              len(f.words) >= (3 if "{c}" in t else 2 if "{b}" in t else 1 if "{a}" in t else 0)]
    if not usable:
        return None
    a, b, c = (f.words + ["", "", ""])[:3]
    return rng.choice(usable).format(topic=f.topic, a=a, b=b, c=c)


def _turn(user: str, reply: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def task_write(f, other, rng):
    req = _write_request(f, rng)
    return _turn(req, f.story) if req else None


def task_continue(f, other, rng):
    return _turn(rng.choice(CONTINUE).format(opening=f.opening), f.rest) if f.rest else None


def task_begin_with(f, other, rng):
    return _turn(rng.choice(BEGIN_WITH).format(opening=f.opening), f.story) if f.rest else None


def task_sentence(f, other, rng):
    if rng.random() < 0.6:
        return _turn(_with_story(f.story, rng.choice(FIRST_SENTENCE), rng), f.first)
    return _turn(_with_story(f.story, rng.choice(LAST_SENTENCE), rng), f.last)


def task_who(f, other, rng):
    if not f.character:
        return None
    if rng.random() < 0.5:
        return _turn(_with_story(f.story, rng.choice(WHO), rng), f"The story is about {f.character}.")
    q = rng.choice(NAME).format(noun=f.noun)
    return _turn(_with_story(f.story, q, rng), f"The {f.noun}'s name is {f.name}.")


def task_repeat(f, other, rng):
    s = rng.choice(f.sentences) if f.sentences else None
    if not s or not 4 <= len(s.split()) <= 30:
        return None
    return _turn(rng.choice(REPEAT).format(s=s), s)


def task_again(f, other, rng):
    req = _write_request(f, rng)
    return _turn(req, f.story) + _turn(rng.choice(AGAIN), f.story) if req else None


def task_another(f, other, rng):
    req = _write_request(f, rng)
    if not req or not other.topic:
        return None
    return _turn(req, f.story) + _turn(rng.choice(ANOTHER).format(topic=other.topic), other.story)


def task_own_sentence(f, other, rng):
    req = _write_request(f, rng)
    if not req:
        return None
    if rng.random() < 0.5:
        return _turn(req, f.story) + _turn(rng.choice(OWN_FIRST), f.first)
    return _turn(req, f.story) + _turn(rng.choice(OWN_LAST), f.last)


def task_greeting(f, other, rng):
    turns = _turn(rng.choice(GREETINGS), rng.choice(GREETING_REPLIES))
    req = _write_request(f, rng)
    return turns + _turn(req, f.story) if req and rng.random() < 0.5 else turns


TASKS = {  # name: (weight, builder(facts, other story's facts, rng) -> messages or None)
    "write": (0.30, task_write),
    "continue": (0.13, task_continue),
    "begin_with": (0.06, task_begin_with),
    "sentence": (0.09, task_sentence),
    "who": (0.05, task_who),
    "repeat": (0.05, task_repeat),
    "again": (0.10, task_again),
    "another": (0.10, task_another),
    "own_sentence": (0.07, task_own_sentence),
    "greeting": (0.05, task_greeting),
}


def story_conversation(story: str, other_story: str, rng: random.Random, task: str | None = None):
    """(task name, messages) for one story, the task drawn by weight unless given; None if it does not apply."""
    f, other = StoryFacts(story, rng), StoryFacts(other_story, rng)
    if task is None:
        names = list(TASKS)
        task = rng.choices(names, weights=[TASKS[n][0] for n in names])[0]
    messages = TASKS[task][1](f, other, rng)
    if messages is None:
        return None
    if rng.random() < 0.3:
        messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] + messages
    return task, messages


def book_passages(books: list[str], n: int, rng: random.Random) -> list[list[dict]]:
    """'Continue this passage' conversations from book paragraphs of 40-200 words."""
    paragraphs = [p for b in books for p in b.split("\n") if 40 <= len(p.split()) <= 200]
    out = []
    for p in rng.sample(paragraphs, min(n, len(paragraphs))):
        sents = sentences(p)
        if len(sents) < 3:
            continue
        k = rng.randint(1, 2)
        out.append(_turn(rng.choice(PASSAGE).format(opening=" ".join(sents[:k])), " ".join(sents[k:])))
    return out


def build_conversations(stories: list[str], per_story: int, seed: int, books: list[str] = (),
                        n_book: int = 0) -> tuple[list[list[dict]], Counter]:
    """``per_story`` conversations per story (tasks drawn independently) plus ``n_book`` book passages,
    shuffled; also the count of each task."""
    rng = random.Random(seed)
    convs, counts = [], Counter()
    for story in stories:
        for _ in range(per_story):
            other = stories[rng.randrange(len(stories))] if len(stories) > 1 else story
            made = story_conversation(story, other, rng)
            if made:
                counts[made[0]] += 1
                convs.append(made[1])
    passages = book_passages(list(books), n_book, rng) if n_book else []
    counts["passage"] = len(passages)
    convs += passages
    rng.shuffle(convs)
    return convs, counts
