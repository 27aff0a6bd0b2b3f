# piapi — LLM coding-assistant gateway (FastCGI responder)
VERSION  := 0.1.0
PREFIX   ?= /usr/local
DESTDIR  ?=
BUILD    ?= build
CC       ?= cc
PKGS     := fcgi libcurl yaml-0.1 libcjson sqlite3 hiredis

PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   := $(shell pkg-config --libs $(PKGS) 2>/dev/null || echo -lfcgi -lcurl -lyaml -lcjson -lsqlite3 -lhiredis)
CUNIT_LIBS := $(shell pkg-config --libs cunit 2>/dev/null || echo -lcunit)

OPT      ?= -O2
CFLAGS   ?= $(OPT) -g
SAN      ?=
# Sanitizer builds also check that the event loop's thread never reads
# what is not there yet (fcgi_conn.h, PIAPI_LOOP_CHECKS).
ifeq ($(SAN),asan)
SANFLAGS := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined \
            -DPIAPI_LOOP_CHECKS
endif
ifeq ($(SAN),tsan)
SANFLAGS := -fsanitize=thread -fno-omit-frame-pointer -DPIAPI_LOOP_CHECKS
endif
ALL_CFLAGS  = -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror -pthread \
              -Iinclude -DPIAPI_VERSION='"$(VERSION)"' $(PKG_CFLAGS) \
              $(SANFLAGS) $(CFLAGS) -MMD -MP
ALL_LDFLAGS = -pthread $(SANFLAGS) $(LDFLAGS)

SRCS     := $(wildcard src/*.c)
OBJS     := $(SRCS:src/%.c=$(BUILD)/obj/%.o)
LIB_OBJS := $(filter-out $(BUILD)/obj/main.o,$(OBJS))
UNIT_SRC := $(wildcard tests/unit/test_*.c)
UNIT_BIN := $(UNIT_SRC:tests/unit/%.c=$(BUILD)/tests/%)

Q := $(if $(V),,@)

.PHONY: all test unit integration check deps test-deps bench-deps fuzz-deps unit-bins run install uninstall clean bench fuzz asan tsan
all: $(BUILD)/piapi

$(BUILD)/piapi: $(OBJS)
	@echo "  LD      $@"
	$(Q)$(CC) $(ALL_LDFLAGS) -o $@ $^ $(PKG_LIBS)

$(BUILD)/obj/%.o: src/%.c
	@mkdir -p $(@D)
	@echo "  CC      $<"
	$(Q)$(CC) $(ALL_CFLAGS) -c -o $@ $<

$(BUILD)/tests/%: tests/unit/%.c $(LIB_OBJS)
	@mkdir -p $(@D)
	@echo "  CC      $<"
	$(Q)$(CC) $(ALL_CFLAGS) -Itests/unit -o $@ $< $(LIB_OBJS) $(ALL_LDFLAGS) $(PKG_LIBS) $(CUNIT_LIBS)

# `make test` is the one command CI and developers run: it installs what is
# missing, builds, runs every unit and integration test and ends with one
# "N passed, M failed" line.
test: test-deps
	$(Q)$(MAKE) --no-print-directory all unit-bins
	$(Q)BUILD=$(BUILD) tests/run.sh

# (the demo provider too: the `make run` tests start it)
unit-bins: $(UNIT_BIN) $(BUILD)/demo-provider

unit: test-deps
	$(Q)$(MAKE) --no-print-directory all unit-bins
	$(Q)BUILD=$(BUILD) tests/run.sh unit

integration: test-deps
	$(Q)$(MAKE) --no-print-directory all $(BUILD)/demo-provider
	$(Q)BUILD=$(BUILD) tests/run.sh integration

# Sanitizer builds of the same suites, each in its own tree. Reports go to
# files that tests/run.sh counts, so one written at a process's exit (a
# leak) fails the run even though no test saw it.
asan: test-deps
	$(Q)$(MAKE) --no-print-directory BUILD=build/asan SAN=asan OPT=-O1 all unit-bins
	$(Q)BUILD=build/asan PIAPI_SANITIZER_LOGS=$(CURDIR)/build/asan/reports \
	    ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:log_path=$(CURDIR)/build/asan/reports/report \
	    UBSAN_OPTIONS=print_stacktrace=1:log_path=$(CURDIR)/build/asan/reports/report \
	    PIAPI_SANITIZED=1 PIAPI_LEAK_SKIP=1 PIAPI_IT_TIMEOUT=1800 tests/run.sh  # LeakSanitizer replaces valgrind here

# Threads: the loop's lock-free queues and everything shared with the pool.
# The one thread leak is deliberate: a second signal exits at once.
tsan: test-deps
	$(Q)$(MAKE) --no-print-directory BUILD=build/tsan SAN=tsan OPT=-O1 all unit-bins
	$(Q)BUILD=build/tsan PIAPI_SANITIZER_LOGS=$(CURDIR)/build/tsan/reports \
	    TSAN_OPTIONS=report_thread_leaks=0:atexit_sleep_ms=0:second_deadlock_stack=1:log_path=$(CURDIR)/build/tsan/reports/report \
	    PIAPI_SANITIZED=1 PIAPI_LEAK_SKIP=1 PIAPI_IT_TIMEOUT=1800 tests/run.sh

deps:
	$(Q)scripts/install-deps.sh

test-deps:
	$(Q)scripts/install-deps.sh test

bench-deps:
	$(Q)scripts/install-deps.sh bench

fuzz-deps:
	$(Q)scripts/install-deps.sh fuzz

# The local stand-in provider `make run` starts while config.yaml is the
# untouched example (scripts/run.sh). Not part of piapi: libc only.
$(BUILD)/demo-provider: tools/demo_provider.c
	@mkdir -p $(@D)
	@echo "  CC      $<"
	$(Q)$(CC) $(ALL_CFLAGS) -o $@ $< $(ALL_LDFLAGS)

# nginx (private prefix under build/) + piapi on :9200, in the foreground.
run: deps all $(BUILD)/demo-provider
	$(Q)BUILD=$(BUILD) scripts/run.sh

bench: bench-deps all
	$(Q)tests/bench/run.sh

fuzz: fuzz-deps
	$(Q)tests/fuzz/run.sh

check: all
	$(Q)$(BUILD)/piapi --check-config --config $${CONFIG:-config.yaml.example}

install: all
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/share/doc/piapi
	install -m 0755 $(BUILD)/piapi $(DESTDIR)$(PREFIX)/bin/piapi
	install -m 0644 config.yaml.example README.md $(DESTDIR)$(PREFIX)/share/doc/piapi/

uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/piapi
	rm -rf $(DESTDIR)$(PREFIX)/share/doc/piapi

clean:
	rm -rf build

-include $(OBJS:.o=.d) $(UNIT_BIN:=.d)
