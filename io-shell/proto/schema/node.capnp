# The NodeService wire schema (ARCHITECTURE.md § Protocol).
#
# One request per QUIC bidirectional stream: the client writes one `Request`
# message (standard, unpacked Cap'n Proto serialization) and finishes the
# stream; the server answers with one `Response` message. The codec in
# `../src/lib.rs` turns these into the core's typed values and back; the Rust
# code in `../src/generated/` is generated from this file by `../regen.sh`.
#
# Evolution: Cap'n Proto forbids gaps in ordinals, so room for later methods
# (enqueueBatch, fetchWaitChannels and enqueueMany came this way) is made by appending: a new
# method is a new member at the end of `Request.body` with the next free
# ordinals, and its answer a new member at the end of `Response.ok`. Union
# discriminants follow ordinal order, so existing members keep their values
# and an old peer sees the new member as an unknown discriminant, which the
# codec reports as "unknown method" instead of misreading it. Never renumber,
# reorder or retype an existing field. A new argument of an existing method
# is a new field with the next free ordinal whose default (zero) means what
# the method did before it (`cipherSuite` came this way).
#
# Byte fields are `Data` so the schema stays language-neutral; the codec checks
# their lengths (identity keys 32 bytes, signatures 64, message ids 16,
# channel ids at most 16, nonces and fingerprints 32).

@0xa263c331be19b140;

# One call of a NodeService method.
struct Request {
  # The connection-authentication scheme the client speaks; the server refuses
  # any value other than the one it implements (currently 1).
  authVersion @0 :UInt16;

  # The method and its arguments; exactly one member is set.
  body :union {
    # Ask for a fresh single-use nonce to sign for `authenticate`.
    authChallenge @1 :Void;

    # Prove ownership of an identity on this connection.
    authenticate :group {
      # The Ed25519 public key being claimed (32 bytes).
      identityKey @2 :Data;
      # Ed25519 signature (64 bytes) over the domain-separated message holding
      # the nonce and the connection's TLS exporter value.
      signature @3 :Data;
    }

    # Append a KeyPackage to the caller's own pool.
    uploadKeyPackage :group {
      # Whose pool; must be the connection's identity (32 bytes).
      identityKey @4 :Data;
      # The serialized MLS KeyPackage, opaque to the server; non-empty.
      package @5 :Data;
      # Replace the last-resort package instead of appending to the pool.
      lastResort @6 :Bool;
      # Which of the identity's pools: 0 (the default pool, what a client
      # that names none gets) or an MLS cipher suite the server keeps pools
      # for (0x0001-0x0007, 0x004D-0x004F). The server does not parse the
      # package; a fetcher checks its suite.
      cipherSuite @37 :UInt16;
    }

    # Take (remove and return) the oldest KeyPackage of an identity.
    fetchKeyPackage :group {
      # Whose package to take (32 bytes).
      identityKey @7 :Data;
      # From which of its pools (as in `uploadKeyPackage`).
      cipherSuite @38 :UInt16;
    }

    # Count the KeyPackages left in the caller's own pool.
    keyPackageCount :group {
      # Whose pool; must be the connection's identity (32 bytes).
      identityKey @8 :Data;
      # Which of its pools (as in `uploadKeyPackage`).
      cipherSuite @39 :UInt16;
    }

    # Store the caller's signed hybrid (X25519 + ML-KEM-768) public key.
    uploadHybridKey :group {
      # Whose key; must be the connection's identity (32 bytes).
      identityKey @9 :Data;
      # The hybrid public key, opaque to the server.
      hybridKey @10 :Data;
      # Ed25519 signature (64 bytes) by `identityKey` over the hybrid key.
      signature @11 :Data;
    }

    # Fetch an identity's hybrid public key and its signature.
    fetchHybridKey :group {
      # Whose key to fetch (32 bytes).
      identityKey @12 :Data;
    }

    # Append a payload to the queue (recipientKey, channelId).
    enqueue :group {
      # The recipient's identity (32 bytes).
      recipientKey @13 :Data;
      # The recipient's channel: empty for the default queue, else at most
      # 16 bytes.
      channelId @14 :Data;
      # The opaque payload (an MLS message); the server never parses it.
      payload @15 :Data;
      # Sender-chosen id (16 bytes); a retry by the same sender with the same
      # id is stored once and answered with the original seq.
      messageId @16 :Data;
    }

    # Acknowledge messages up to a cursor and read the ones after it.
    fetch :group {
      # Whose queue; must be the connection's identity (32 bytes).
      recipientKey @17 :Data;
      # Which channel: empty for the default queue, else at most 16 bytes.
      channelId @18 :Data;
      # Messages with seq <= afterSeq are acknowledged and deleted.
      afterSeq @19 :UInt64;
      # Most messages to return; 0 only acknowledges.
      limit @20 :UInt32;
    }

    # As `fetch`, but wait for a message if none is pending.
    fetchWait :group {
      # Whose queue; must be the connection's identity (32 bytes).
      recipientKey @21 :Data;
      # Which channel: empty for the default queue, else at most 16 bytes.
      channelId @22 :Data;
      # Messages with seq <= afterSeq are acknowledged and deleted.
      afterSeq @23 :UInt64;
      # Most messages to return; at least 1.
      limit @24 :UInt32;
      # How long to wait, in milliseconds; the server clamps it to its bound.
      timeoutMs @25 :UInt64;
    }

    # One payload to many recipients' queues on one channel, stored once:
    # all or nothing; answered with each recipient's seq (enqueuedBatch).
    enqueueBatch :group {
      # The recipients (32 bytes each), each at most once, at most 1,000.
      recipientKeys @26 :List(Data);
      # Which channel: empty for the default queue, else at most 16 bytes.
      channelId @27 :Data;
      # The opaque payload, stored once for all recipients.
      payload @28 :Data;
      # 16 bytes chosen by the sender; a retry (same sender, same id) is
      # stored once per recipient.
      messageId @29 :Data;
    }

    # One long-poll over several channels of the caller's queues; answered
    # with the channels that have messages (channelMessages).
    fetchWaitChannels :group {
      # Whose queues; must be the connection's identity (32 bytes).
      recipientKey @30 :Data;
      # One cursor per channel, each channel at most once, at most 256.
      cursors @31 :List(ChannelCursor);
      # Most messages returned per channel; at least 1.
      limit @32 :UInt32;
      # How long to wait, in milliseconds; the server clamps it to its bound.
      timeoutMs @33 :UInt64;
    }

    # Several payloads, in order, to the same recipients' queues on one
    # channel: all or nothing. Each recipient's queue gets the messages in the
    # order listed, one after another; answered with enqueuedBatch, whose seqs
    # go message by message, each message's seqs in the order of the
    # recipients. Lets a sender keep one request per queue in flight (the only
    # way to keep its order) and still move many messages per round trip.
    enqueueMany :group {
      # The recipients (32 bytes each), each at most once, at most 1,000;
      # recipients times messages at most 4,096.
      recipientKeys @34 :List(Data);
      # Which channel: empty for the default queue, else at most 16 bytes.
      channelId @35 :Data;
      # The messages, oldest first, at most 64, their ids distinct.
      messages @36 :List(OutgoingMessage);
    }

    # Later methods go here, at ordinal 37 and up.
  }
}

# The answer to one `Request`: a result or a typed error.
struct Response {
  union {
    # The call succeeded; one member per method.
    ok :union {
      # A fresh single-use nonce for `authenticate`.
      authChallenge :group {
        # The nonce to sign (32 bytes).
        nonce @0 :Data;
      }

      # The connection is now bound to the claimed identity.
      authenticated @1 :Void;

      # The KeyPackage is stored.
      keyPackageUploaded :group {
        # SHA-256 of the stored package (32 bytes), so the client can detect
        # a server that altered it.
        fingerprint @2 :Data;
      }

      # One KeyPackage, removed from the pool unless it is the last resort.
      keyPackage :group {
        # The serialized KeyPackage.
        package @3 :Data;
        # True if this is the last-resort package, which the server keeps.
        lastResort @4 :Bool;
      }

      # The size of the caller's KeyPackage pool.
      keyPackageCount :group {
        # Single-use packages remaining.
        count @5 :UInt32;
        # Whether a last-resort package is stored.
        hasLastResort @6 :Bool;
      }

      # The hybrid key is stored.
      hybridKeyUploaded @7 :Void;

      # An identity's hybrid public key with the owner's signature over it.
      hybridKey :group {
        # The hybrid public key.
        hybridKey @8 :Data;
        # The owner's Ed25519 signature (64 bytes); the caller verifies it.
        signature @9 :Data;
      }

      # The payload is stored durably.
      enqueued :group {
        # The payload's position in its queue.
        seq @10 :UInt64;
      }

      # Messages after the cursor, for `fetch` and `fetchWait`.
      messages :group {
        # Oldest first, in seq order without gaps; at most the request's limit.
        messages @11 :List(QueuedMessage);
        # The seq the next enqueue to this queue will get.
        nextSeq @12 :UInt64;
        # Seqs gapFrom..=gapTo after the cursor were dropped by the server's
        # message TTL before they were fetched; gapTo = 0 when none were.
        gapFrom @16 :UInt64;
        gapTo @17 :UInt64;
      }

      # The payload is stored durably in every recipient's queue (also the
      # answer to enqueueMany: every payload in every recipient's queue).
      enqueuedBatch :group {
        # Each recipient's seq, in the order of the request's recipients;
        # for enqueueMany, message by message, each in recipient order.
        seqs @14 :List(UInt64);
      }

      # The channels of a `fetchWaitChannels` with messages, in the order of
      # the request's cursors; empty when the wait ran out.
      channelMessages :group {
        channels @15 :List(ChannelMessages);
      }

      # Answers to later methods go here, at ordinal 18 and up.
    }

    # The call failed.
    error @13 :Error;
  }
}

# A queued message as `fetch` returns it.
struct QueuedMessage {
  # Its position in the queue.
  seq @0 :UInt64;
  # The opaque payload as it was enqueued.
  payload @1 :Data;
}

# One message of an `enqueueMany`.
struct OutgoingMessage {
  # The opaque payload, stored once for all recipients.
  payload @0 :Data;
  # 16 bytes chosen by the sender; a retry (same sender, same id) is
  # stored once per recipient.
  messageId @1 :Data;
}

# One channel's cursor in a `fetchWaitChannels`.
struct ChannelCursor {
  # Which channel: empty for the default queue, else at most 16 bytes.
  channelId @0 :Data;
  # Messages with seq <= afterSeq are acknowledged and deleted.
  afterSeq @1 :UInt64;
}

# One channel's messages in a `channelMessages` answer.
struct ChannelMessages {
  # Which channel.
  channelId @0 :Data;
  # Oldest first, in seq order without gaps.
  messages @1 :List(QueuedMessage);
  # The seq the next enqueue to this channel's queue will get.
  nextSeq @2 :UInt64;
  # As in `messages`: seqs dropped by the message TTL; gapTo = 0 when none.
  gapFrom @3 :UInt64;
  gapTo @4 :UInt64;
}

# A typed error: clients act on `kind`; `message` is for humans.
struct Error {
  # What went wrong.
  kind :union {
    # The request is malformed or breaks a documented rule.
    invalidArgument @0 :Void;
    # The connection has not proved an identity, or the proof failed.
    unauthenticated @1 :Void;
    # The connection's identity may not act on this resource.
    permissionDenied @2 :Void;
    # The resource does not exist.
    notFound @3 :Void;
    # A payload, package or key exceeds its size limit.
    payloadTooLarge @4 :Void;
    # Too many requests.
    rateLimited :group {
      # How long to wait before retrying, in milliseconds.
      retryAfterMs @5 :UInt64;
    }
    # The queue or KeyPackage pool is at its depth or byte limit.
    queueFull @6 :Void;
    # A Commit for an epoch that already has one.
    staleEpoch :group {
      # The epoch the channel is at now.
      currentEpoch @7 :UInt64;
    }
    # The server cannot take the request now; retrying later may succeed.
    unavailable @8 :Void;
    # A bug or corrupted storage on the server side.
    internal @9 :Void;
  }
  # A human-readable explanation (UTF-8); never contains keys or payloads.
  message @10 :Text;
}
