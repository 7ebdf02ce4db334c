from alexnet_mp.cli import main

if __name__ == "__main__":  # not again in a process spawned to decode JPEGs on a GPU
    main()
