#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import KNet
import Testing

/// A chat server: each message a client sends goes to every other client. The server's
/// receive sends to connections of other loops (and its own) while every loop does the
/// same; frames are [id][seq BE32].
private final class ChatServer: TCPHandler {
    let members = Locked<[Int: TCPConnection]>([:])
    let refused = Locked(0)
    let threads = Locked<[ObjectIdentifier: pthread_t]>([:])
    let wrongThread = Locked(0)
    let limit: Int

    init(limit: Int) { self.limit = limit }

    private func checkThread(_ conn: TCPConnection) {
        let me = pthread_self()
        threads.withLock { map in
            let key = ObjectIdentifier(conn)
            if let first = map[key] {
                if pthread_equal(first, me) == 0 { wrongThread.withLock { $0 += 1 } }
            } else {
                map[key] = me
            }
        }
    }

    func connect(_ conn: TCPConnection, connected: Bool) {
        checkThread(conn)
        if connected {
            if limit > 0 { conn.setPendingSend(limit) }
        } else {
            members.withLock { map in
                for (id, member) in map where member === conn { map[id] = nil }
            }
        }
    }

    func receive(_ conn: TCPConnection, _ buf: [UInt8]) {
        checkThread(conn)
        let id = Int(buf[0])
        if buf.count == 1 {
            members.withLock { $0[id] = conn }
            return
        }
        members.withLock { map in
            for (other, member) in map where other != id {
                do { try member.send(buf) } catch KNetError.pendingSendFull {
                    refused.withLock { $0 += 1 }
                } catch {
                    wrongThread.withLock { $0 += 1000 } // no other error is expected
                }
            }
        }
    }
}

/// Runs the chat on `loops` loop threads, with StdCodec and a Swift codec, without and
/// with a pending-send limit; exits non-zero at the first broken promise. Call it in a
/// process of its own (the loop count is fixed once the loops run).
private func chatBroadcast(loops: Int) -> Never {
    precondition((try? setLoopThreads(loops)) != nil)
    precondition(loopThreadCount == loops)
    for (codec, limit) in [(StdCodec() as any Codec, 0), (ThreeByteCodec() as any Codec, 0),
                           (ThreeByteCodec() as any Codec, 2)] {
        let chat = ChatServer(limit: limit)
        guard let server = try? ServerHarness(handler: chat, codec: codec) else { exit(2) }
        let k = 2 * loops, perClient = 100
        var clients: [(RecordingHandler, ClientHarness)] = []
        for id in 0..<k {
            let h = RecordingHandler(onConnect: { conn in try? conn.send([UInt8(id)]) })
            clients.append((h, ClientHarness(port: server.port, handler: h, codec: codec)))
        }
        guard eventually(.seconds(20), { chat.members.withLock { $0.count } == k }) else { exit(3) }
        let senders = clients.enumerated().map { id, client in
            Background {
                guard let conn = client.1.client.connection else { throw KNetError.connectionClosed }
                for seq in 0..<perClient {
                    let s = UInt32(seq)
                    try conn.send([UInt8(id), UInt8(s >> 24), UInt8((s >> 16) & 255),
                                   UInt8((s >> 8) & 255), UInt8(s & 255)])
                }
            }
        }
        for sender in senders where sender.join() != nil { exit(4) }
        let want = k * perClient * (k - 1)
        // Every broadcast send was made (accepted or refused) and each accepted one arrived.
        guard eventually(.seconds(20), {
            clients.reduce(0) { $0 + $1.0.totalMessages } + chat.refused.withLock { $0 } == want
        }) else { exit(5) }
        if limit == 0 && chat.refused.withLock({ $0 }) != 0 { exit(6) }
        var loopThreads: [pthread_t] = []
        for (id, client) in clients.enumerated() {
            guard let record = client.0.only else { exit(7) }
            if !loopThreads.contains(where: { pthread_equal($0, record.thread) != 0 }) {
                loopThreads.append(record.thread)
            }
            var next = [Int](repeating: 0, count: k)
            for m in record.messages {
                guard m.count == 5, Int(m[0]) != id else { exit(8) }
                let seq = Int(m[1]) << 24 | Int(m[2]) << 16 | Int(m[3]) << 8 | Int(m[4])
                // In order; a gap only where the server's send met the limit.
                if seq < next[Int(m[0])] || (limit == 0 && seq != next[Int(m[0])]) { exit(9) }
                next[Int(m[0])] = seq + 1
            }
        }
        chat.threads.withLock { map in
            for thread in map.values where !loopThreads.contains(where: { pthread_equal($0, thread) != 0 }) {
                loopThreads.append(thread)
            }
        }
        if loopThreads.count != loops { exit(10) }
        for (_, client) in clients where client.stop() != .clientClosed { exit(11) }
        guard server.stop() == .serverClosed else { exit(12) }
        if chat.wrongThread.withLock({ $0 }) != 0 { exit(13) }
    }
    exit(0)
}

/// More loop threads than cores (3 and 8 on a 2-core machine).
extension KNetTests {
    @Suite struct LoopThreadsTests {
        @Test("chat broadcast from every loop to every other on 3 loops: every frame in order, callbacks on one thread")
        func broadcastAcrossThreeLoops() async {
            await #expect(processExitsWith: .success) { chatBroadcast(loops: 3) }
        }

        @Test("chat broadcast from every loop to every other on 8 loops: every frame in order, callbacks on one thread")
        func broadcastAcrossEightLoops() async {
            await #expect(processExitsWith: .success) { chatBroadcast(loops: 8) }
        }
    }
}
